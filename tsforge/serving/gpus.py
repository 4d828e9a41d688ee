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

The settings of each device can be read back from any archive, whatever host packaged it (`device_settings`): the
`gpu:` section is always packaged, and an archive packaged for a GPU records the top-level values that section
replaced under `cpu:`. The KServe bundle (tsforge/kube/kserve.py) writes one configuration per runtime from them.

Tests on a host without a GPU count fake ones: `TSFORGE_FAKE_GPUS=N` (FAKE_GPUS_ENV) stands for N devices, 0..N-1,
of which CUDA_VISIBLE_DEVICES picks as it would real ones. `visible_gpus` is the only reader, and it warns on stderr
each time it counts fake devices. TorchServe counts its own (nvidia-smi, or the ids CUDA_VISIBLE_DEVICES lists), so
a test that also sets CUDA_VISIBLE_DEVICES=0,1,... makes TorchServe hand its workers fake GPU ids too; a worker
whose torch finds no CUDA then runs on the CPU (handlers/placement.py pick_device).
"""

from __future__ import annotations

import json
import logging
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
#: tests only: this many fake CUDA devices stand in for the real ones (see the module's docstring)
FAKE_GPUS_ENV = "TSFORGE_FAKE_GPUS"
#: model-config.yaml's per-device sections: `gpu:` as written, `cpu:` as an archive packaged for a GPU records it
DEVICES = ("cpu", "gpu")

log = logging.getLogger(__name__)


def visible_gpus(cap: str | None = None) -> int:
    """CUDA devices this process (and so TorchServe's workers, which inherit its environment) can use; fake ones
    where FAKE_GPUS_ENV is set. `cap`: the profile's number_of_gpu, if it sets one.

    torch is imported only where a GPU driver is installed: on a CPU host this costs nothing and says 0."""
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake is not None:
        count = len(fake_devices(fake, os.environ.get("CUDA_VISIBLE_DEVICES")))
        log.warning("%s=%s: counting %d fake GPU(s), not this host's devices (for tests only)", FAKE_GPUS_ENV,
                    fake, count)
    else:
        count = _cuda_devices()
    if cap is not None and cap.strip().isdigit():
        count = min(count, int(cap))
    return count


def _cuda_devices() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidiactl").exists():
        return 0
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def fake_devices(fake: str, visible: str | None) -> list[int]:
    """The ids of `fake` (a count) fake devices that `visible` (CUDA_VISIBLE_DEVICES) leaves, as CUDA reads it:
    unset shows all, and the list ends at its first entry that is not a device (so "" and "-1" show none)."""
    if not fake.strip().isdigit():
        raise ValueError(f"{FAKE_GPUS_ENV} must be a number of fake GPUs; got {fake!r}")
    devices = list(range(int(fake)))
    if visible is None:
        return devices
    shown: list[int] = []
    for entry in visible.split(","):
        entry = entry.strip()
        if not entry.isdigit() or int(entry) not in devices or int(entry) in shown:
            break
        shown.append(int(entry))
    return shown


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


def gpu_changes(config: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level TorchServe keys that the `gpu:` section replaces where it applies: every key of the section but
    `handler` (applied in each CUDA worker) and workers_per_gpu, which packages as minWorkers = maxWorkers (one GPU's
    worth). Empty without a section."""
    section = config.get("gpu")
    if not isinstance(section, Mapping):
        return {}
    changed = {k: v for k, v in section.items() if k not in ("handler", PER_GPU_KEY)}
    workers = per_gpu(config)
    if workers is not None:
        changed.update(minWorkers=workers, maxWorkers=workers)
    return changed


def device_settings(config: Mapping[str, Any], device: str) -> dict[str, Any]:
    """An archive's model-config.yaml as it applies on `device` (cpu or gpu), whatever host packaged it: on gpu
    with the `gpu:` section's changes, on cpu with the top-level values recorded under `cpu:` (written where the
    archive was packaged for a GPU; absent, the top level is the CPU's)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    section = gpu_changes(config) if device == "gpu" else config.get("cpu")
    return {**config, **(section if isinstance(section, Mapping) else {})}


def snapshot_models(snapshot: str | None) -> list[str]:
    """`NAME=FILE.mar` for each default version that a model_snapshot (JSON) registers; [] without one."""
    if not snapshot:
        return []
    found = []
    for name, versions in json.loads(snapshot).get("models", {}).items():
        for entry in versions.values():
            if entry.get("defaultVersion", len(versions) == 1):
                found.append(f"{name}={entry['marName']}")
    return found


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
