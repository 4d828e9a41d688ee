"""Single-host throughput as measured by `make bench`, and what one Kubernetes replica can be asked to carry.

The figures come from the committed summary of `make bench MODEL=NAME`, `docs/data/bench-NAME.json` (the same
file docs/benchmarks.md and docs/scaling.md are rendered from), never from the rendered pages. A model without
one gets the fallback below, marked as such, with the missing file named, wherever it is used.

The rule (written out for each model in the bundle's DERIVATION.md by `tsforge.kube.kserve`):

- **target concurrency** per replica = the smallest measured concurrency whose throughput reaches
  `KNEE_SHARE` of the best measured throughput: past it, more requests in flight only add queueing.
- **capacity** per replica = the throughput measured at that concurrency.
- **CPU** = the measured host's cores (the bench's load generator shared them, so a pod that has them to
  itself does at least as well); requests = limits, so the pod's CPU is the one measured.
- **memory** = the peak RSS of TorchServe's frontend and workers at that concurrency x `MEMORY_HEADROOM`,
  rounded up to 256 MiB; requests = limits (Guaranteed QoS: the replica is not evicted first under pressure).
- **fallback** (model not measured): target concurrency = maxWorkers x batchSize from the archive's
  model-config.yaml (one full batch per worker in flight; it equals the measured knee of ResNet-18 and is
  within 13 % of digits' throughput at it), capacity unknown, CPU and memory of the largest measured model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KNEE_SHARE = 0.9
MEMORY_HEADROOM = 1.3
MEMORY_STEP_MIB = 256
KNATIVE_TARGET_UTILIZATION = 0.7  # Knative's default container-concurrency-target-percentage
FALLBACK_CORES = 2
FALLBACK_MEMORY_MIB = 4096  # when nothing at all was measured


@dataclass(frozen=True)
class Level:
    concurrency: int
    qps: float
    p99_ms: float
    cpu_percent: float | None
    rss_mb: float | None  # TorchServe frontend + workers, peak


@dataclass(frozen=True)
class Measurement:
    model: str
    source: str  # where the figures were read, relative to the project root
    run: str  # when the run was taken
    cores: int | None
    machine: str
    levels: tuple[Level, ...]

    @property
    def best(self) -> Level:
        return max(self.levels, key=lambda level: level.qps)

    @property
    def knee(self) -> Level:
        peak = self.best.qps
        return min((lv for lv in self.levels if lv.qps >= KNEE_SHARE * peak), key=lambda lv: lv.concurrency)


@dataclass(frozen=True)
class Sizing:
    """What one replica of a model is given and asked to carry."""

    model: str
    measured: Measurement | None
    target_concurrency: int
    capacity_qps: float | None
    cpu: int
    memory_mib: int
    reason: str

    def replicas_for(self, load_qps: float, utilization: float = KNATIVE_TARGET_UTILIZATION) -> int | None:
        """Replicas that carry `load_qps` with each kept at `utilization` of its measured capacity."""
        if not self.capacity_qps:
            return None
        return max(1, math.ceil(load_qps / (self.capacity_qps * utilization)))


def _round_memory(mb: float) -> int:
    mib = mb * 1_000_000 / 2**20 * MEMORY_HEADROOM
    return int(math.ceil(mib / MEMORY_STEP_MIB) * MEMORY_STEP_MIB)


class MissingMeasurement(LookupError):
    """No committed `make bench` summary for a model."""


def data_file(model: str, root: Path) -> Path:
    """Where `make bench MODEL=model` commits its summary."""
    return root / "docs" / "data" / f"bench-{model}.json"


def _shown(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _level(row: dict[str, Any]) -> Level:
    server = row.get("server") or {}
    rss = [(server.get(part) or {}).get("peak_rss_mb") for part in ("frontend", "workers")]
    total = sum(float(r) for r in rss if r is not None) if all(r is not None for r in rss) else None
    return Level(int(row["level"]), float(row["qps"]), float(row["latency_ms"]["p99"]), server.get("cpu_percent"),
                 total)


def from_bench_json(path: Path, root: Path) -> Measurement:
    """One `make bench` summary (docs/data/bench-NAME.json): its tsforge rows, the machine it ran on."""
    try:
        result: dict[str, Any] = json.loads(path.read_text())
        rows = [row for row in result["rows"] if row["target"] == "tsforge" and row.get("qps")]
        levels = tuple(sorted((_level(row) for row in rows), key=lambda level: level.concurrency))
        model = str(result["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{_shown(path, root)} is not a `make bench` summary: {exc!r}") from exc
    machine = result.get("machine") or {}
    return Measurement(model, _shown(path, root), str(result.get("created", "?")), machine.get("cores"),
                       f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores", levels)


def load(model: str, root: Path) -> Measurement:
    """`model`'s measurement; MissingMeasurement names the file and the command that writes it."""
    path = data_file(model, root)
    if not path.is_file():
        raise MissingMeasurement(f"{model}: no measurement, {_shown(path, root)} is missing "
                                 f"(`make bench MODEL={model}` writes it)")
    measurement = from_bench_json(path, root)
    if measurement.model != model:
        raise ValueError(f"{_shown(path, root)} holds a bench of {measurement.model}, not of {model}")
    if not measurement.levels:
        raise MissingMeasurement(f"{model}: {_shown(path, root)} has no tsforge row with correct answers")
    return measurement


def measurements(root: Path, directory: Path | None = None) -> dict[str, Measurement]:
    """Every model with a committed summary (in root's docs/data/, or `directory`). Only `bench-NAME.json` of a
    bench of NAME counts: other names hold other runs (`bench-resnet18-matrix.json`: every variant pinned, not the
    archive as shipped)."""
    found: dict[str, Measurement] = {}
    for path in sorted((directory or data_file("*", root).parent).glob("bench-*.json")):
        measurement = from_bench_json(path, root)
        if path.name == data_file(measurement.model, root).name and measurement.levels:
            found[measurement.model] = measurement
    return found


def size(model: str, workers: int, batch_size: int, measured: dict[str, Measurement]) -> Sizing:
    """One replica's target concurrency, capacity, CPU and memory for `model` (see the module's rule)."""
    own = measured.get(model)
    if own is not None:
        knee = own.knee
        cores = own.cores or FALLBACK_CORES
        memory = _round_memory(knee.rss_mb) if knee.rss_mb else FALLBACK_MEMORY_MIB
        best = own.best
        against = ("the best measured" if knee == best else
                   f"the first within {KNEE_SHARE:.0%} of the best, {best.qps:g} req/s at {best.concurrency}")
        reason = (f"measured ({own.source}, run {own.run}, {own.machine}): {knee.qps:g} req/s at concurrency "
                  f"{knee.concurrency} (P99 {knee.p99_ms:g} ms), {against}")
        return Sizing(model, own, knee.concurrency, knee.qps, cores, memory, reason)
    heaviest = max(measured.values(), key=lambda m: m.knee.rss_mb or 0.0, default=None)
    cores = (heaviest.cores if heaviest else None) or FALLBACK_CORES
    rss = heaviest.knee.rss_mb if heaviest else None
    memory = _round_memory(rss) if rss else FALLBACK_MEMORY_MIB
    basis = f"CPU and memory of {heaviest.model}, the largest measured" if heaviest else "default CPU and memory"
    reason = (f"not measured (fallback; no docs/data/bench-{model}.json): target = maxWorkers {workers} x batchSize "
              f"{batch_size}; {basis}; capacity unknown until `make bench MODEL={model}` is run")
    return Sizing(model, None, max(1, workers * batch_size), None, cores, memory, reason)
