"""Which variant (backend x precision x fusion) a worker serves with: named in the config, or measured.

    handler:
      backend: auto          torchscript | onnxruntime | aotinductor | auto
      precision: auto        fp32 | bf16 | fp16 | int8 | auto
      onednn_fusion: auto    true | false | auto (TorchScript on a CPU)
      auto_tolerance: 0.02   largest discrepancy from fp32 that `auto` accepts (the handler defines it)
      reduced_precision: cast   how TorchScript runs bf16/fp16: cast (weights cast, then frozen) | autocast

A setting that names a value wins. For `auto` the candidates are what the device runs natively
(`handlers.capabilities`: no bf16 without AMX or AVX512-BF16, no int8 without a fast int8 path) and what
the archive carries (an int8 file only when its export met the model's accuracy bound). Each candidate
is timed on a real batch (the archive's example inputs) and compared with fp32 TorchScript on the same
batch; the fastest within `auto_tolerance` wins, the earlier (simpler) one when within `margin` of it.

The measurement is shared through a small file per (archive version file, device, threads, batch size,
settings) in `$TSFORGE_CACHE_DIR` (default `~/.cache/tsforge`): the first worker measures under a file
lock, the others, restarted workers and in-process runs of the same archive (benchmark references) load
what it chose. So all serve the same program, a second worker's start does not skew the first one's
timings, and a restart is quick. Delete the folder to measure again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from handlers.capabilities import Capabilities
from handlers.runtimes import BACKENDS, CASTS, PRECISIONS, Artefacts, Runner, Variant, VariantUnavailable

log = logging.getLogger(__name__)
AUTO = "auto"
ALL_PRECISIONS = (*PRECISIONS, "int8")
#: how far one program's served output may move with the composition of its batch (kernels pick other
#: blockings for other batch sizes), as the largest change of a probability: the bound tests use
REPRODUCIBILITY = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2, "int8": 1e-2}
#: the smallest cosine similarity of a served sentence embedding to sentence-transformers' fp32 one
EMBEDDING_COSINE = {"fp32": 0.999, "fp16": 0.995, "bf16": 0.99, "int8": 0.98}


@dataclass(frozen=True)
class Settings:
    backend: str = AUTO
    precision: str = AUTO
    fusion: str = AUTO
    tolerance: float = 0.02
    margin: float = 0.05
    cast: str = "cast"

    @classmethod
    def from_config(cls, config: dict[str, Any], *, tolerance: float) -> Settings:
        """From a `handler:` section; a value outside the allowed ones is refused with the allowed ones named."""
        backend = str(config.get("backend", AUTO)).lower()
        precision = str(config.get("precision", AUTO)).lower()
        fusion = str(config.get("onednn_fusion", AUTO)).lower()
        cast = str(config.get("reduced_precision", "cast")).lower()
        for key, value, allowed in (("backend", backend, (*BACKENDS, AUTO)),
                                    ("precision", precision, (*ALL_PRECISIONS, AUTO)),
                                    ("onednn_fusion", fusion, ("true", "false", AUTO)),
                                    ("reduced_precision", cast, CASTS)):
            if value not in allowed:
                raise ValueError(f"model-config.yaml handler.{key} is {value!r}; expected one of {', '.join(allowed)}")
        return cls(backend, precision, fusion, float(config.get("auto_tolerance", tolerance)), cast=cast)


def candidates(settings: Settings, caps: Capabilities, artefacts: Artefacts) -> list[Variant]:
    """The variants to consider, fp32 TorchScript (the reference) first; only those the archive can serve."""
    backends = BACKENDS if settings.backend == AUTO else (settings.backend,)
    if settings.precision != AUTO:
        precisions = [settings.precision]
    else:
        precisions = [*caps.precisions(), *(["int8"] if caps.fast_int8 else [])]
    found = []
    for backend in backends:
        for precision in precisions:
            for fusion in _fusions(settings, caps, backend, precision):
                variant = Variant(backend, precision, fusion)
                if artefacts.has(variant) and _accurate_enough(variant, artefacts, settings):
                    found.append(variant)
    return found


def _fusions(settings: Settings, caps: Capabilities, backend: str, precision: str) -> list[bool]:
    if backend != "torchscript" or precision == "int8" or caps.device != "cpu":
        return [False]
    return [False, True] if settings.fusion == AUTO else [settings.fusion == "true"]


def _accurate_enough(variant: Variant, artefacts: Artefacts, settings: Settings) -> bool:
    """An int8 file is a candidate for `auto` only when its export met the model's accuracy bound."""
    entry = artefacts.entry(variant)
    return entry is None or settings.precision != AUTO or bool(entry.get("within_bound", True))


@dataclass
class Trial:
    variant: Variant
    seconds: float | None = None  # median per batch
    discrepancy: float | None = None  # against fp32 TorchScript on the same batch
    error: str | None = None
    runner: Runner | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant.name, "ms_per_batch": None if self.seconds is None else
                round(self.seconds * 1000, 3), "discrepancy": self.discrepancy, "error": self.error}


@dataclass
class Choice:
    variant: Variant
    measured: bool
    reason: str
    trials: list[Trial] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant.name, **self.variant.to_json(), "measured": self.measured,
                "reason": self.reason, "trials": [t.to_json() for t in self.trials]}


def pick(trials: Sequence[Trial], tolerance: float, margin: float) -> Trial:
    """The fastest trial whose output stays within `tolerance` of the reference; among those within
    `margin` of the fastest, the earliest. Raises ValueError when none qualifies."""
    good = [t for t in trials if t.seconds is not None and t.discrepancy is not None and t.discrepancy <= tolerance]
    if not good:
        raise ValueError("no variant ran within tolerance: " + "; ".join(
            f"{t.variant.name}: {t.error or f'discrepancy {t.discrepancy}'}" for t in trials))
    best = min(t.seconds for t in good if t.seconds is not None)
    return next(t for t in good if t.seconds is not None and t.seconds <= best * (1 + margin))


def run_trials(variants: Sequence[Variant], load: Callable[[Variant], Runner], inputs: Sequence[torch.Tensor],
               discrepancy: Callable[[torch.Tensor, torch.Tensor], float], *, repeats: int = 3,
               budget_s: float = 0.05, clock: Callable[[], float] = time.perf_counter) -> list[Trial]:
    """Load and time each variant on `inputs` (the median of at least `repeats` calls, more until `budget_s`
    has passed, so that sub-millisecond models are timed over many calls); the first variant's output is the
    reference the others are compared with."""
    trials: list[Trial] = []
    reference: torch.Tensor | None = None
    for variant in variants:
        trial = Trial(variant)
        trials.append(trial)
        try:
            runner = load(variant)
            with torch.inference_mode():
                output = runner(*inputs)  # the first calls compile/optimise per shape: not timed
                runner(*inputs)
                times: list[float] = []
                while len(times) < repeats or (sum(times) < budget_s and len(times) < 1000):
                    started = clock()
                    _finished(runner(*inputs))
                    times.append(clock() - started)
        except (VariantUnavailable, RuntimeError, ValueError, OSError) as exc:
            trial.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1]}"  # not the traceback
            log.warning("variant %s is not usable here: %s", variant.name, trial.error)
            continue
        if reference is None:
            reference = output
        trial.seconds = statistics.median(times)
        trial.discrepancy = round(float(discrepancy(reference, output)), 6)
        trial.runner = runner
    return trials


def _finished(output: torch.Tensor) -> None:
    """Wait for the GPU: a CUDA call returns when its kernels are queued, not when they are done."""
    if output.is_cuda:
        torch.cuda.synchronize(output.device)


def cache_dir() -> Path:
    return Path(os.environ.get("TSFORGE_CACHE_DIR") or Path.home() / ".cache" / "tsforge")


@contextlib.contextmanager
def shared_decision(key: str) -> Iterator[Path]:
    """The file in which the workers of one model (same archive and settings) share their choice, held under
    an exclusive lock while the caller reads or writes it."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"choice-{digest}.json"
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remembered(path: Path) -> Variant | None:
    try:
        data = json.loads(path.read_text())
        return Variant(str(data["backend"]), str(data["precision"]), bool(data["fusion"]))
    except (OSError, ValueError, KeyError):
        return None


def remember(path: Path, choice: Choice) -> None:
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps({**choice.to_json(), "pid": os.getpid()}))
    temporary.replace(path)
