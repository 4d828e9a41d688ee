"""Where a worker runs: its device, the `gpu:` settings that apply there, and its torch threads."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)


def default_threads(workers: int) -> int:
    """Torch threads per worker when the config names none: the cores, less one for TorchServe's frontend,
    shared among the workers: a worker that takes every core serves less, because its threads fight the
    frontend's (the measurements: docs/benchmarks-previous.md)."""
    return max(1, ((os.cpu_count() or 1) - 1) // max(1, workers))


#: `handler.threads: cores`: every core of this machine shared among the workers, none kept for the frontend, for
#: models whose inference dwarfs the frontend's work per request (a detector); counted at worker start
ALL_CORES = "cores"


def worker_threads(config: Mapping[str, Any], model_config: Mapping[str, Any] | None) -> int:
    """`handler.threads` (a number, or `cores`), else `default_threads` for the model's `maxWorkers`."""
    threads = config.get("threads")
    workers = max(1, int((model_config or {}).get("maxWorkers") or 1))
    if threads is None:
        return default_threads(workers)
    if threads == ALL_CORES:
        return cores_per_worker(workers)
    return int(threads)


def cores_per_worker(workers: int) -> int:
    """Every core of this machine shared among `workers` (at least one each)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def device_overrides(model_config: Mapping[str, Any] | None, device: torch.device) -> dict[str, Any]:
    """The `handler:` keys of model-config.yaml's `gpu:` section, which apply when a worker's device is CUDA."""
    if device.type != "cuda":
        return {}
    section = (model_config or {}).get("gpu") or {}
    return dict(section.get("handler") or {}) if isinstance(section, Mapping) else {}


def pick_device(gpu_id: Any, config: dict[str, Any], model_config: Mapping[str, Any] | None) -> torch.device:
    """`cuda:<gpu_id>` when TorchServe gave the worker a GPU that torch sees and `handler.device` is not "cpu";
    there the `gpu:` section's `handler:` keys are applied to `config` (logged). The CPU otherwise."""
    if not (torch.cuda.is_available() and gpu_id is not None and config.get("device", "auto") != "cpu"):
        return torch.device("cpu")
    device = torch.device(f"cuda:{gpu_id}")
    overrides = device_overrides(model_config, device)
    if overrides:
        config.update(overrides)
        log.info("device %s: gpu section of model-config.yaml applied: %s", device, overrides)
    return device
