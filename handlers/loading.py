"""How a handler loads its model: the variant of the archive's export that serves fastest here among those
that keep the model's accuracy bound on this machine.

`VariantLoading.load_model` reads the archive's exports (`handlers.runtimes`), lists the candidates this
device runs (`handlers.autoselect`), reuses the decision another worker of this archive made on this
machine or measures one: each candidate timed on the archive's example inputs, then checked, in order of
preference, on its held-out inputs against fp32 TorchScript (`handlers.accuracy`). A mixin of `BatchHandler`:
it calls the handler's own hooks (decode, prepare_batch, collate, infer), so the check sees what clients get.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from handlers import accuracy, autoselect, provenance, runtimes
from handlers.capabilities import detect, fingerprint
from handlers.errors import RequestError
from handlers.telemetry import Telemetry

log = logging.getLogger(__name__)


class VariantLoading:
    """The model-loading half of a handler; the handler provides the attributes and hooks declared here."""

    context: Any
    model_dir: Path
    device: torch.device
    settings: autoselect.Settings
    channels_last: bool
    batch_size: int
    telemetry: Telemetry
    selection: dict[str, Any]

    def decode_request(self, payload: Any) -> list[Any]:
        raise NotImplementedError

    def prepare_batch(self, items: list[Any]) -> list[Any]:
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        raise NotImplementedError

    def infer(self, batch: Any) -> Any:
        raise NotImplementedError

    def unbatch(self, output: Any, count: int) -> list[Any]:
        raise NotImplementedError

    def discrepancy(self, reference: torch.Tensor, output: torch.Tensor) -> float:
        raise NotImplementedError

    def heldout_row(self, row: Any) -> torch.Tensor:
        """One `unbatch` row as the tensor the held-out measure compares (`handlers.accuracy`): the row itself
        by default; handlers with structured rows (a detector's dict) override it."""
        return row if isinstance(row, torch.Tensor) else torch.as_tensor(row)

    def load_variant(self, variant: runtimes.Variant, artefacts: runtimes.Artefacts) -> runtimes.Runner:
        """A runner for one variant of the archive's export (`handlers.runtimes`); handlers whose model is not
        a tensors-in, tensor-out program (detectors) override it."""
        return runtimes.load(variant, artefacts, self.device, channels_last=self.channels_last,
                             cast=self.settings.cast)

    def sample_inputs(self) -> tuple[Any, ...] | None:
        """A full batch built from the archive's `examples.json` requests, as `infer` receives it."""
        examples = self.model_dir / "examples.json"
        if not examples.is_file():
            return None
        items: list[Any] = []
        for case in json.loads(examples.read_text()):
            items.extend(self.decode_request(case["input"]))
        if not items:
            return None
        batch = self.collate((items * self.batch_size)[: self.batch_size])
        return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)

    def load_model(self) -> runtimes.Runner:
        """The runner of the variant this worker serves: named in the config, or measured (`auto`) on the
        archive's example inputs; either way checked on its held-out inputs against fp32 on this machine
        (`handlers.accuracy`). The choice, its timings and figures go to the model log and to `describe`."""
        serialized = ((self.context.manifest or {}).get("model") or {}).get("serializedFile")
        if not serialized:
            raise RuntimeError("the archive has no serialized model file")
        artefacts = runtimes.Artefacts.read(self.model_dir, serialized)
        capabilities = detect(self.device)
        variants = autoselect.candidates(self.settings, capabilities, artefacts)
        if not variants:
            raise ValueError(f"no variant of this archive runs on {capabilities.name} with backend="
                             f"{self.settings.backend}, precision={self.settings.precision}; the archive has "
                             f"{', '.join(['torchscript', *artefacts.extra]) or 'no model file'}")
        load = functools.partial(self.load_variant, artefacts=artefacts)
        if variants == [autoselect.REFERENCE]:  # fp32 TorchScript is what the others are checked against
            runner, decided = load(variants[0]), {"variant": variants[0].name, **variants[0].to_json(),
                                                  "reason": "the only candidate for these settings here"}
        else:
            runner, decided = self._measure_or_reuse(variants, load)
        self.selection = {"capabilities": capabilities.to_json(), "candidates": [v.name for v in variants],
                          **decided}
        if decided.get("below_bound"):
            log.warning("serving %s below its accuracy bound (handler.accept_lower_accuracy): %s",
                        decided["variant"], decided.get("accuracy"))
        self.telemetry.accuracy(decided.get("accuracy"))
        log.info("serving %s: %s", self.selection["variant"], json.dumps(self.selection))
        return runner

    def _measure_or_reuse(self, variants: list[runtimes.Variant],
                          load: Callable[[runtimes.Variant], runtimes.Runner]
                          ) -> tuple[runtimes.Runner, dict[str, Any]]:
        """Reuse the decision of a worker of this archive on this machine, or measure and record it."""
        record = (self.model_dir / provenance.VERSION_FILE).read_bytes()  # binds the key to these exact files
        key = json.dumps([hashlib.sha256(record).hexdigest(), str(self.device), torch.get_num_threads(),
                          self.batch_size, repr(self.settings), [v.name for v in variants],
                          fingerprint(self.device)], sort_keys=True)
        with autoselect.shared_decision(key) as shared:
            known = autoselect.remembered(shared)
            if known is not None and known in variants:
                decided = json.loads(shared.read_text())
                return load(known), {**decided, "reason": f"measured by worker {decided.get('pid')}: "
                                                          f"{decided.get('reason')}"}
            choice, runner = self._decide(variants, load)
            autoselect.remember(shared, choice)
            return runner, choice.to_json()

    def _decide(self, variants: list[runtimes.Variant], load: Callable[[runtimes.Variant], runtimes.Runner]
                ) -> tuple[autoselect.Choice, runtimes.Runner]:
        """Time the candidates, then check them in order of preference on the held-out inputs, within
        `selection_budget_s`: a timing or check that would pass it (judged from the first variant's pace) is not
        started, and the reference serves."""
        started = time.perf_counter()
        deadline = started + self.settings.budget_s
        reference = load(autoselect.REFERENCE)
        heldout = accuracy.HeldOut.read(self.model_dir, self.settings.accuracy_bound)  # read once for both uses
        check = self.accuracy_check(reference, heldout)
        inputs = self.sample_inputs()
        if len(variants) == 1:
            runner = reference if variants[0] == autoselect.REFERENCE else load(variants[0])
            trial = autoselect.Trial(variants[0], runner=runner)
            choice = autoselect.only(trial, self.settings, check)
        elif inputs is None:  # nothing to time on: the candidates in order, the first that loads within the bound
            trials = [autoselect.loaded(v, load, reference) for v in variants]
            choice = autoselect.choose(trials, self.settings, check, 0)
            choice.reason = "no example inputs in the archive to time on; " + choice.reason
        else:
            trials = autoselect.run_trials(variants, load, inputs, self.discrepancy, reference, deadline=deadline)
            over = self._check_over_budget(trials[0], len(inputs[0]), deadline, heldout)
            if over:
                choice = autoselect.Choice(autoselect.REFERENCE, True, over, trials)
            else:
                choice = autoselect.choose(trials, self.settings, check, self.batch_size)
        served = next((t.runner for t in choice.trials if t.variant == choice.variant), None) or reference
        log.info("chose %s in %.2fs", choice.variant.name, time.perf_counter() - started)
        return choice, served

    def _check_over_budget(self, reference: autoselect.Trial, timed_items: int, deadline: float,
                           heldout: accuracy.HeldOut | None) -> str | None:
        """Why the held-out check is not started (reference and candidate on every held-out input, at the pace
        of the first variant timed, would end after `deadline`), or None."""
        if heldout is None or reference.seconds is None:
            return None
        needed = 2 * len(heldout.inputs) * reference.seconds / max(1, timed_items)
        if time.perf_counter() + needed <= deadline:
            return None
        return (f"fp32 TorchScript, unchecked against faster variants: their check on the {len(heldout.inputs)} "
                f"held-out inputs would take about {needed:.0f} s, past handler.selection_budget_s "
                f"({self.settings.budget_s:g} s; raise it, and the model's startupTimeout, to measure them)")

    def accuracy_check(self, reference: runtimes.Runner,
                       heldout: accuracy.HeldOut | None = None) -> autoselect.Check | None:
        """The held-out check of a runner: the archive's `heldout.json` inputs through this handler's own
        decode, batching and `infer`, compared with fp32 TorchScript's answers (computed once)."""
        if heldout is None:  # called on its own (tests), not from `_decide`
            heldout = accuracy.HeldOut.read(self.model_dir, self.settings.accuracy_bound)
        if heldout is None:
            return None
        batches = self._heldout_batches(heldout.inputs)
        expected: list[torch.Tensor] = []

        def check(runner: runtimes.Runner) -> accuracy.Verdict:
            if not expected:  # the reference's answers, once, when a variant is first checked
                expected.extend(self._outputs(reference, batches))
            return heldout.verdict(expected, self._outputs(runner, batches))

        return check

    def _heldout_batches(self, payloads: list[Any]) -> list[tuple[Any, int]]:
        """The held-out inputs decoded, prepared and collated in batches of the configured size, each with
        its count of items."""
        items: list[Any] = []
        for payload in payloads:
            items.extend(self.decode_request(payload))
        prepared = self.prepare_batch(items)
        failed = next((item for item in prepared if isinstance(item, RequestError)), None)
        if failed is not None:
            raise ValueError(f"a held-out input of this archive is refused by its own handler: {failed.message}")
        size = max(1, self.batch_size)
        chunks = [prepared[i : i + size] for i in range(0, len(prepared), size)]
        return [(self.collate(chunk), len(chunk)) for chunk in chunks]

    def _outputs(self, runner: runtimes.Runner, batches: list[tuple[Any, int]]) -> list[torch.Tensor]:
        """What `infer` then `unbatch` give `encode` for each held-out input with `runner` as the model: one
        tensor a row (`heldout_row`), on the CPU."""
        served = self.__dict__.get("model")
        self.model = runner
        try:
            with torch.inference_mode():
                rows = [row for batch, count in batches for row in self.unbatch(self.infer(batch), count)]
        finally:
            self.__dict__["model"] = served
        return [self.heldout_row(row).cpu() for row in rows]
