"""Workers per GPU: the `gpu:` section of config/models/NAME.yaml says how many workers one GPU gets
(`workers_per_gpu`); the server start multiplies that by the GPUs TorchServe will use.

TorchServe takes a model's worker count from the archive's model-config.yaml, fixed when the archive was built,
and hands its workers out round-robin over `number_of_gpu` devices. An archive built for one GPU would leave the
other GPUs of a bigger host idle (the issue measured 1.32x for two GPUs with the same 8 workers), and one built
for four would overload a host with one. So the archive carries one GPU's worth (a plain `torchserve` then serves
one GPU well) and `TorchServe.start` (tsforge serve, the tests, the benchmarks):

- counts the GPUs visible here (`torch.cuda.device_count()`, which honours CUDA_VISIBLE_DEVICES), capped by
  the profile's own `number_of_gpu` if it sets one, and writes that count as `number_of_gpu`, so TorchServe's
  device assignment and the worker count agree even when TorchServe's own probe (nvidia-smi) would differ;
- once each model is registered, scales it to workers_per_gpu x GPUs (management API), before it is called ready.

Explicit `minWorkers`/`maxWorkers` in a `gpu:` section are totals and switch the multiplication off.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
import yaml

PER_GPU_KEY = "workers_per_gpu"
GPU_COUNT_KEY = "number_of_gpu"  # TorchServe's key: it uses min(its own probe, this)


def visible_gpus(cap: str | None = None) -> int:
    """CUDA devices this process (and so TorchServe's workers, which inherit its environment) can use.

    torch is imported only where a GPU driver is installed: on a CPU host this costs nothing and says 0."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidiactl").exists():
        return 0
    import torch

    count = int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    if cap is not None and cap.strip().isdigit():
        count = min(count, int(cap))
    return count


def archive_config(mar: Path) -> dict[str, Any]:
    """The model-config.yaml packaged in an archive; empty when it has none or it cannot be read."""
    try:
        with zipfile.ZipFile(mar) as archive:
            config = yaml.safe_load(archive.read("model-config.yaml")) or {}
    except (OSError, KeyError, zipfile.BadZipFile, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def per_gpu(config: Mapping[str, Any]) -> int | None:
    """The `gpu:` section's workers per GPU; None when it gives none, or gives totals (minWorkers) instead."""
    section = config.get("gpu")
    if not isinstance(section, Mapping) or "minWorkers" in section:
        return None
    value = section.get(PER_GPU_KEY)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"gpu.{PER_GPU_KEY} must be a positive integer; got {value!r}")
    return value


def worker_plan(store: Path, models: Sequence[str], gpus: int) -> dict[str, int]:
    """model name -> workers, for the models (`NAME=FILE.mar` or `NAME`) whose archive says workers per GPU."""
    if gpus < 1:
        return {}
    plan: dict[str, int] = {}
    for entry in models:
        name, _, file = entry.partition("=")
        count = per_gpu(archive_config(store / (file or f"{name}.mar")))
        if count is not None:
            plan[name] = count * gpus
    return plan


def scale(management_url: str, headers: Mapping[str, str], model: str, workers: int) -> bool:
    """Ask TorchServe for `workers` workers of `model`'s default version; False while it is not registered yet
    (the caller retries until its own deadline). TorchServe starts them in the background."""
    params: dict[str, str | int] = {"min_worker": workers, "max_worker": workers, "synchronous": "false"}
    try:
        answer = requests.put(f"{management_url}/models/{model}", params=params, headers=dict(headers), timeout=5)
    except requests.RequestException:
        return False
    return answer.status_code in (200, 202)
