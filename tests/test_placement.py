"""A worker's torch threads (handlers/placement.py): counted on this machine at worker start, never assumed."""

import os

from handlers.placement import default_threads, worker_threads


def test_worker_threads_take_a_number_all_cores_or_the_default() -> None:
    cores = os.cpu_count() or 1
    assert worker_threads({"threads": 3}, {"maxWorkers": 2}) == 3
    assert worker_threads({"threads": "cores"}, {"maxWorkers": 1}) == cores
    assert worker_threads({"threads": "cores"}, {"maxWorkers": 2 * cores}) == 1
    assert worker_threads({}, {"maxWorkers": 1}) == default_threads(1) == max(1, cores - 1)
