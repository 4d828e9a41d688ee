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
    pixel_agreement  the share of all pixels whose class is fp32's (segmenters' class maps)
    detection_f1     per image, the F1 score of the detections against fp32's (a match: same label, IoU >= 0.5),
                     averaged over the images (detectors; rows are [K, 6]: x1, y1, x2, y2, score, label)

A row is what the handler's `unbatch` gives `encode` for one input, as a tensor (`heldout_row`).

`handler.accuracy_bound` in the config replaces the declared minimum; `handler.accept_lower_accuracy: true`
lets a variant named in the config serve below it, with a warning and the HandlerAccuracyBelowBound metric.
`auto` never serves below the bound.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HELDOUT_FILE = "heldout.json"


Rows = Sequence[torch.Tensor]


def top1_agreement(reference: Rows, output: Rows) -> float:
    return float((torch.stack(list(reference)).argmax(-1) == torch.stack(list(output)).argmax(-1)).float().mean())


def min_cosine(reference: Rows, output: Rows) -> float:
    expected, served = torch.stack(list(reference)).float(), torch.stack(list(output)).float()
    cosine = torch.nn.functional.cosine_similarity(served.flatten(1), expected.flatten(1), dim=1)
    return float(cosine.min())


def pixel_agreement(reference: Rows, output: Rows) -> float:
    same = sum(int((r == o).sum()) for r, o in zip(reference, output, strict=True))
    return same / max(1, sum(r.numel() for r in reference))


def detection_f1(reference: Rows, output: Rows) -> float:
    scores = [_f1(r.float().reshape(-1, 6), o.float().reshape(-1, 6)) for r, o in zip(reference, output, strict=True)]
    return sum(scores) / max(1, len(scores))


def _f1(reference: torch.Tensor, output: torch.Tensor, iou: float = 0.5) -> float:
    """Each served detection, best score first, matches the unmatched reference detection of its label that
    overlaps it most, if by at least `iou`: twice the matches over both counts (1.0 when both are empty)."""
    if not len(reference) and not len(output):
        return 1.0
    overlaps = _box_iou(output[:, :4], reference[:, :4])
    overlaps[output[:, 5, None] != reference[None, :, 5]] = 0.0
    matches = 0
    for n in torch.argsort(output[:, 4], descending=True, stable=True).tolist():
        best = int(overlaps[n].argmax()) if len(reference) else -1
        if best >= 0 and float(overlaps[n, best]) >= iou:
            matches += 1
            overlaps[:, best] = 0.0
    return 2 * matches / (len(reference) + len(output))


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of every box of `a` with every box of `b` (xyxy)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.max(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


MEASURES: dict[str, Callable[[Rows, Rows], float]] = {
    "top1_agreement": top1_agreement, "min_cosine": min_cosine, "pixel_agreement": pixel_agreement,
    "detection_f1": detection_f1}


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

    def verdict(self, reference: Rows, output: Rows) -> Verdict:
        """The bound's measure of the served rows against fp32's (one row per held-out input)."""
        if len(reference) != len(output):
            raise ValueError(f"{len(output)} rows served for {len(reference)} held-out inputs")
        value = MEASURES[self.bound.measure](reference, output)
        return Verdict(self.bound.measure, value, self.bound.minimum, len(reference))


def heldout_file(measure: str, minimum: float, inputs: list[Any], about: str) -> bytes:
    """The `heldout.json` an export writes into the archive."""
    Bound(measure, minimum)  # refuses an unknown measure at export, not at worker start
    return json.dumps({"measure": measure, "minimum": minimum, "about": about, "inputs": inputs}).encode()
