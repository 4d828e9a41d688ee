"""Test-only handler: the digits handler with faults injected from model-config.yaml's `handler.fault` section.

    handler:
      fault:
        fail_starts: [2]   # initialize raises on these worker starts (1 = the first start of the model)
        sleep_s: 5         # the model's first `slow_batches` batches (all workers, all starts) sleep this long
        slow_batches: 1    # before inference: a model slower than responseTimeout, then fast again

Packaged only by the tests (tsforge.packaging.archive --handler tests/fault_handler.py); `describe()` also lists the
names
of the environment variables the worker sees, for the secrets check.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from handlers.digits_handler import DigitsHandler

# One line per worker start / slow batch, beside the unpacked archive that every worker of the model shares
# (inside it, the archive's integrity check would refuse the extra file).
STARTS_FILE = "fault-starts"
BATCHES_FILE = "fault-slow-batches"


class FaultHandler(DigitsHandler):
    def setup(self) -> None:
        fault = dict(self.config.get("fault") or {})
        start = self._count(STARTS_FILE)
        if start in [int(n) for n in fault.get("fail_starts", [])]:
            raise RuntimeError(f"injected failure on worker start {start}")
        self.sleep_s = float(fault.get("sleep_s", 0.0))
        self.slow_batches = int(fault.get("slow_batches", 0))
        super().setup()

    def _count(self, name: str) -> int:
        """Append one line to the shared file `name`; how many lines it holds now."""
        with self.model_dir.with_name(f"{self.model_dir.name}.{name}").open("a+") as record:
            record.write(f"{os.getpid()}\n")
            record.flush()
            record.seek(0)
            return len(record.read().splitlines())

    def infer(self, batch: torch.Tensor) -> Any:
        if self.sleep_s and self.slow_batches and self._count(BATCHES_FILE) <= self.slow_batches:
            time.sleep(self.sleep_s)
        return super().infer(batch)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "environment": sorted(os.environ)}
