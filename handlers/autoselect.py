"""Which variant (backend x precision x fusion) a worker serves with: named in the config, or measured.

    handler:
      backend: auto          torchscript | onnxruntime | aotinductor | auto
      precision: auto        fp32 | bf16 | fp16 | int8 | auto
      onednn_fusion: auto    true | false | auto (TorchScript on a CPU)
      auto_tolerance: 0.02   largest discrepancy from fp32 that `auto` accepts (the handler defines it)
      reduced_precision: cast   how TorchScript runs bf16/fp16: cast (weights cast, then frozen) | autocast
      accuracy_bound: 0.9       replaces the model's declared minimum of its held-out measure (handlers.accuracy)
      accept_lower_accuracy: false   true: a variant named here may serve below the bound (warned, metric)
      selection_budget_s: 60    the most seconds `auto` may spend timing and checking at worker start; when the
                                model is too slow for that, fp32 TorchScript serves unmeasured (said in the log)

A setting that names a value wins. For `auto` the candidates are what the device runs natively
(`handlers.capabilities`: no bf16 without AMX or AVX512-BF16, no int8 without a fast int8 path) and what
the archive carries. Each candidate is timed on a real batch (the archive's example inputs) and compared
with fp32 TorchScript on the same batch. In order of preference (the fastest within `auto_tolerance`, the
earlier, simpler one when within `margin` of it), each is then checked on the archive's held-out inputs
against fp32 TorchScript on this machine (`handlers.accuracy`); the first within the model's bound is
served. A variant named in the config is checked the same way and refused outside the bound.

The decision is shared through a small file per (archive version file, device, threads, batch size,
settings, this machine's CPU flags and library versions) in `$TSFORGE_CACHE_DIR` (default
`~/.cache/tsforge`): the first worker measures under a file lock, the others, restarted workers and
in-process runs of the same archive (benchmark references) load what it chose. So all serve the same
program, a second worker's start does not skew the first one's timings, and a restart is quick. Delete the
folder to measure again.
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

from handlers.accuracy import AccuracyRefused, Verdict
from handlers.capabilities import Capabilities
from handlers.runtimes import BACKENDS, CASTS, PRECISIONS, Artefacts, Runner, Variant

log = logging.getLogger(__name__)
AUTO = "auto"
ALL_PRECISIONS = (*PRECISIONS, "int8")
#: what every other variant is compared with: the exported program as traced
REFERENCE = Variant("torchscript", "fp32", False)
#: the held-out check of a loaded runner against fp32 on this machine (built by the handler)
Check = Callable[[Runner], Verdict]
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
    accuracy_bound: float | None = None
    accept_lower_accuracy: bool = False
    budget_s: float = 60.0

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
        bound = config.get("accuracy_bound")
        accept = config.get("accept_lower_accuracy", False)
        if not isinstance(accept, bool):
            raise ValueError(f"model-config.yaml handler.accept_lower_accuracy is {accept!r}; expected true or false")
        return cls(backend, precision, fusion, float(config.get("auto_tolerance", tolerance)), cast=cast,
                   accuracy_bound=None if bound is None else float(bound), accept_lower_accuracy=accept,
                   budget_s=float(config.get("selection_budget_s", 60.0)))


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
                if artefacts.has(variant):
                    found.append(variant)
    return found


def _fusions(settings: Settings, caps: Capabilities, backend: str, precision: str) -> list[bool]:
    if backend != "torchscript" or precision == "int8" or caps.device != "cpu":
        return [False]
    if settings.cast == "autocast" and precision != "fp32":
        # oneDNN's graph fuser does not follow the casts autocast inserts: once fused, the program fails at its
        # next call (a float64 constant met a bf16 operand), so reduced precision under autocast runs unfused
        return [False]
    return [False, True] if settings.fusion == AUTO else [settings.fusion == "true"]


@dataclass
class Trial:
    variant: Variant
    seconds: float | None = None  # median per batch
    discrepancy: float | None = None  # against fp32 TorchScript on the same batch
    error: str | None = None
    accuracy: Verdict | None = None  # on the held-out inputs, when it was checked
    runner: Runner | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant.name, "ms_per_batch": None if self.seconds is None else
                round(self.seconds * 1000, 3), "discrepancy": self.discrepancy, "error": self.error,
                "accuracy": None if self.accuracy is None else self.accuracy.to_json()}


@dataclass
class Choice:
    variant: Variant
    measured: bool
    reason: str
    trials: list[Trial] = field(default_factory=list)
    accuracy: Verdict | None = None  # the served variant's, None for fp32 TorchScript itself

    @property
    def below_bound(self) -> bool:
        return self.accuracy is not None and not self.accuracy.within

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant.name, **self.variant.to_json(), "measured": self.measured,
                "reason": self.reason, "accuracy": None if self.accuracy is None else self.accuracy.to_json(),
                "below_bound": self.below_bound, "trials": [t.to_json() for t in self.trials]}


def pick(trials: Sequence[Trial], tolerance: float, margin: float) -> Trial:
    """The fastest trial whose output stays within `tolerance` of the reference; among those within
    `margin` of the fastest, the earliest. Raises ValueError when none qualifies."""
    good = [t for t in trials if t.seconds is not None and t.discrepancy is not None and t.discrepancy <= tolerance]
    if not good:
        raise ValueError("no variant ran within tolerance: " + "; ".join(
            f"{t.variant.name}: {t.error or f'discrepancy {t.discrepancy}'}" for t in trials))
    best = min(t.seconds for t in good if t.seconds is not None)
    return next(t for t in good if t.seconds is not None and t.seconds <= best * (1 + margin))


def ranked(trials: Sequence[Trial], tolerance: float, margin: float) -> Iterator[Trial]:
    """The trials within `tolerance`, best first by `pick`'s rule (each next one is `pick` of the rest)."""
    left = list(trials)
    while True:
        try:
            best = pick(left, tolerance, margin)
        except ValueError:
            return
        yield best
        left.remove(best)


def run_trials(variants: Sequence[Variant], load: Callable[[Variant], Runner], inputs: Sequence[Any],
               discrepancy: Callable[[torch.Tensor, torch.Tensor], float], reference: Runner, *,
               repeats: int = 3, budget_s: float = 0.05, deadline: float = float("inf"),
               clock: Callable[[], float] = time.perf_counter) -> list[Trial]:
    """Load and time each variant on `inputs` (the median of at least `repeats` calls, more until `budget_s`
    has passed, so that sub-millisecond models are timed over many calls), and compare its output with the
    `reference` runner's (fp32 TorchScript). A variant that fails in any way is skipped with the reason; so is
    one whose timing, at the first variant's pace, would end after `deadline` (on `clock`)."""
    with torch.inference_mode():
        expected = reference(*inputs)
    trials: list[Trial] = []
    for variant in variants:
        trial = Trial(variant)
        trials.append(trial)
        pace = trials[0].seconds
        if pace is not None and clock() + pace * (repeats + 2) > deadline:
            trial.error = f"not timed: at {pace:.2f} s a batch it would pass the selection budget"
            log.warning("variant %s: %s", variant.name, trial.error)
            continue
        try:
            runner = reference if variant == REFERENCE else load(variant)
            with torch.inference_mode():
                output = runner(*inputs)  # the first calls compile/optimise per shape: not timed
                runner(*inputs)
                times: list[float] = []
                while len(times) < repeats or (sum(times) < budget_s and len(times) < 1000):
                    started = clock()
                    _finished(runner(*inputs))
                    times.append(clock() - started)
            trial.discrepancy = round(float(discrepancy(expected, output)), 6)
        except Exception as exc:  # any backend's failure (ONNX Runtime raises its own types) skips the variant
            trial.error = _reason(exc)
            log.warning("variant %s is not usable here: %s", variant.name, trial.error)
            continue
        trial.seconds = statistics.median(times)
        trial.runner = runner
    return trials


def loaded(variant: Variant, load: Callable[[Variant], Runner], reference: Runner) -> Trial:
    """An untimed trial (all count as equally fast, so the earliest wins): the runner, or why it cannot load."""
    trial = Trial(variant, seconds=1.0, discrepancy=0.0)
    try:
        trial.runner = reference if variant == REFERENCE else load(variant)
    except Exception as exc:  # as in run_trials: any backend's failure skips the variant
        trial.seconds, trial.error = None, _reason(exc)
        log.warning("variant %s is not usable here: %s", variant.name, trial.error)
    return trial


def _reason(exc: BaseException) -> str:
    """The exception's type and last line, not its traceback."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1]}"


def checked(trial: Trial, check: Check | None) -> Verdict | None:
    """The held-out verdict of a trial's runner (None for fp32 TorchScript, the reference itself, or without a
    held-out set); a failure while checking counts as out of bound, with the reason in the log."""
    if check is None or trial.variant == REFERENCE or trial.runner is None:
        return None
    try:
        trial.accuracy = check(trial.runner)
    except Exception as exc:
        trial.error = _reason(exc)
        log.warning("variant %s failed on the held-out inputs: %s", trial.variant.name, trial.error)
        return Verdict("error", float("nan"), 0.0, 0)
    log.info("variant %s on the held-out inputs: %s", trial.variant.name, trial.accuracy)
    return trial.accuracy


def choose(trials: Sequence[Trial], settings: Settings, check: Check | None, batch: int) -> Choice:
    """Among timed trials, the first by preference whose held-out verdict is within the bound."""
    for trial in ranked(trials, settings.tolerance, settings.margin):
        verdict = checked(trial, check)
        if verdict is None or verdict.within:
            return Choice(trial.variant, True, f"fastest within {settings.tolerance} of fp32 on a batch of {batch} "
                          "example inputs" + ("" if verdict is None else f", and {verdict}"), list(trials), verdict)
        log.warning("not serving %s: %s", trial.variant.name, verdict)
    raise AccuracyRefused("no variant is both within tolerance and within the accuracy bound here: " + "; ".join(
        f"{t.variant.name}: {t.error or t.accuracy or f'discrepancy {t.discrepancy}'}" for t in trials))


def only(trial: Trial, settings: Settings, check: Check | None) -> Choice:
    """The one candidate the settings allow: served when within the bound, or below it when the config accepts
    lower accuracy (warned); refused with the figure otherwise."""
    verdict = checked(trial, check)
    if verdict is None or verdict.within:
        reason = "the only candidate for these settings here" + ("" if verdict is None else f"; {verdict}")
        return Choice(trial.variant, False, reason, [trial], verdict)
    if not settings.accept_lower_accuracy or verdict.measure == "error":
        raise AccuracyRefused(f"refusing to serve {trial.variant.name}: {trial.error or verdict}. Serve fp32, or set "
                              "handler.accept_lower_accuracy: true to accept lower accuracy")
    log.warning("serving %s BELOW its accuracy bound, as handler.accept_lower_accuracy allows: %s",
                trial.variant.name, verdict)
    return Choice(trial.variant, False, f"accepted below the bound by the config: {verdict}", [trial], verdict)


def _finished(output: Any) -> None:
    """Wait for the GPU: a CUDA call returns when its kernels are queued, not when they are done. `output` is a
    tensor, or a structure of them (a detector's list of dicts)."""
    cuda = next((t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_cuda),
                None)
    if cuda is not None:
        torch.cuda.synchronize(cuda.device)


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
