"""The accuracy gate: a variant other than fp32 TorchScript is served only when, on the machine that serves
it, its answers to the archive's held-out inputs stay within the model's declared bound against fp32's.

An archive carries `heldout.json`, written at export from the model's declaration:

    {"measure": "top1_agreement", "minimum": 0.9, "about": "64 views of real photos", "inputs": [payload, ...]}

Each input is a request payload, as a client sends it; it goes through the handler's own decode, batching
and `infer`, so the check sees what clients would be answered. The measures compare the served outputs with
fp32 TorchScript's on the same machine (never figures carried from the export machine: int8 kernels
differ from one CPU to the next):

    top1_agreement   the share of rows whose top class is fp32's (classifiers)
    min_cosine       the smallest cosine similarity of a row to fp32's (embeddings)

`handler.accuracy_bound` in the config replaces the declared minimum; `handler.accept_lower_accuracy: true`
lets a variant named in the config serve below it, with a warning and the HandlerAccuracyBelowBound metric.
`auto` never serves below the bound.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HELDOUT_FILE = "heldout.json"


def top1_agreement(reference: torch.Tensor, output: torch.Tensor) -> float:
    return float((reference.argmax(-1) == output.argmax(-1)).float().mean())


def min_cosine(reference: torch.Tensor, output: torch.Tensor) -> float:
    cosine = torch.nn.functional.cosine_similarity(output.float().flatten(1), reference.float().flatten(1), dim=1)
    return float(cosine.min())


MEASURES: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "top1_agreement": top1_agreement, "min_cosine": min_cosine}


class AccuracyRefused(RuntimeError):
    """The variant named in the config answers the held-out inputs outside the model's bound on this machine."""


@dataclass(frozen=True)
class Bound:
    measure: str
    minimum: float

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"unknown accuracy measure {self.measure!r}; expected one of {', '.join(MEASURES)}")

    def describe(self) -> str:
        return f"{self.measure} >= {self.minimum} against fp32 TorchScript"


@dataclass(frozen=True)
class Verdict:
    measure: str
    value: float
    minimum: float
    inputs: int

    @property
    def within(self) -> bool:
        return self.value >= self.minimum

    def to_json(self) -> dict[str, Any]:
        return {"measure": self.measure, "value": round(self.value, 6), "minimum": self.minimum,
                "inputs": self.inputs, "within_bound": self.within}

    def __str__(self) -> str:
        relation = ">=" if self.within else "<"
        return f"{self.measure} {self.value:.4f} {relation} {self.minimum} on {self.inputs} held-out inputs"


@dataclass(frozen=True)
class HeldOut:
    """The held-out inputs of an archive and the bound its variants must keep on them."""

    bound: Bound
    inputs: list[Any]
    about: str = ""

    @classmethod
    def read(cls, model_dir: Path, minimum: float | None = None) -> HeldOut | None:
        """From the unpacked archive; None when it carries no held-out set (then only fp32 is served)."""
        path = model_dir / HELDOUT_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        bound = Bound(str(data["measure"]), float(data["minimum"] if minimum is None else minimum))
        return cls(bound, list(data["inputs"]), str(data.get("about", "")))

    def verdict(self, reference: torch.Tensor, output: torch.Tensor) -> Verdict:
        value = MEASURES[self.bound.measure](reference.float(), output.float())
        return Verdict(self.bound.measure, value, self.bound.minimum, len(reference))


def heldout_file(measure: str, minimum: float, inputs: list[Any], about: str) -> bytes:
    """The `heldout.json` an export writes into the archive."""
    Bound(measure, minimum)  # refuses an unknown measure at export, not at worker start
    return json.dumps({"measure": measure, "minimum": minimum, "about": about, "inputs": inputs}).encode()
