"""A worker's torch threads (handlers/placement.py), seen from inside a worker: a Python process apart from the
tests initialises the digits archive's handler, as a TorchServe worker does, on a machine of N cores (os.cpu_count,
which the placement counts at worker start, faked to N) for a model of W workers, then reports
torch.get_num_threads() and the threads the handler describes to the management API. The figures expected are
written out, not computed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, built_archive

WORKER = """
import importlib.util, json, os, sys
from pathlib import Path
import torch
import yaml
from loadtest import inprocess
model_dir = inprocess.unpack(Path(sys.argv[2]))
manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
archived = dict(yaml.safe_load((model_dir / "model-config.yaml").read_text()) or {})
entry = model_dir / manifest["model"]["handler"].split(":")[0]
spec = importlib.util.spec_from_file_location("_placement_worker", entry)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
seen = []
for cores, workers, threads in json.loads(sys.argv[1]):
    os.cpu_count = lambda: cores  # the machine this worker believes it is on
    torch.set_num_threads(97)  # what the handler must replace
    handler = {**(archived.get("handler") or {}), "backend": "torchscript", "precision": "fp32",
               "onednn_fusion": False}
    handler.pop("threads", None)
    if threads is not None:
        handler["threads"] = threads
    config = {**archived, "maxWorkers": workers, "minWorkers": workers, "handler": handler}
    local = inprocess.LocalHandler(model_dir, inprocess._handler_class(module)(), manifest, config)
    local.handler.initialize(local.context(1))
    seen.append({"torch": torch.get_num_threads(), "described": local.handler.describe()["threads"]})
print(json.dumps(seen))
"""

#: what would set the threads behind the handler's back
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

# (cores of the machine, workers of the model, handler.threads) -> torch threads each worker runs with
CASES = [
    ((8, 1, None), 7),      # the default keeps one core for TorchServe's frontend
    ((8, 2, None), 3),      # ... and shares the other 7 between two workers, rounding down
    ((2, 2, None), 1),      # never fewer than one
    ((1, 1, None), 1),
    ((8, 1, "cores"), 8),   # `cores`: every core, none kept for the frontend
    ((8, 2, "cores"), 4),   # shared between two workers: 4 each, not 8 each
    ((8, 3, "cores"), 2),
    ((2, 4, "cores"), 1),
    ((8, 2, 3), 3),         # a number is taken as it is
]


@pytest.fixture(scope="module")
def seen() -> dict[tuple[int, int, int | str | None], dict[str, int]]:
    """What a worker started under each setting of CASES reports (one process runs them one after the other, each
    a fresh handler of the archive, after torch's threads were set to 97)."""
    settings = [setting for setting, _ in CASES]
    result = subprocess.run([sys.executable, "-c", WORKER, json.dumps(settings), str(built_archive("digits"))],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES})
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(zip(settings, json.loads(result.stdout.strip().splitlines()[-1]), strict=True))


@pytest.mark.parametrize(("setting", "expected"), CASES, ids=lambda c: "-".join(map(str, c)) if isinstance(
    c, tuple) else str(c))
def test_a_worker_runs_with_its_share_of_the_cores(seen: dict, setting: tuple, expected: int) -> None:
    cores, workers, threads = setting
    found = seen[setting]
    assert found == {"torch": expected, "described": expected}, (
        f"{workers} worker(s) on {cores} cores with handler.threads={threads}: the worker runs {found['torch']} "
        f"torch threads, expected {expected}")
