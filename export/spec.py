"""The declaration of an exportable model and the result of exporting it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class ExportError(RuntimeError):
    """Export refused: the traced program does not reproduce the eager model."""


@dataclass
class PreparedModel:
    """What a factory hands back: a ready eager module and the inputs that exercise it.

    `example_inputs` is used for tracing; `check_inputs` (held-out data) for the parity check.
    `metrics` holds figures measured by the factory itself, such as test accuracy.
    `calibration` (real inputs, batched along the first axis) calibrates int8 exports;
    `quality(fp32_runner, runner)` measures what a variant costs in accuracy on held-out data.
    `heldout` (request payloads, as clients send them) travels in the archive as `heldout.json`: each worker
    checks the variant it would serve on them against fp32 on its own machine (handlers/accuracy.py);
    `heldout_about` says in a few words what they are.
    """

    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    check_inputs: tuple[torch.Tensor, ...] | None = None
    labels: list[str] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    extra_files: dict[str, bytes] = field(default_factory=dict)
    calibration: tuple[torch.Tensor, ...] | None = None
    quality: Callable[[Callable[..., torch.Tensor], Callable[..., torch.Tensor]], dict[str, float]] | None = None
    heldout: list[Any] | None = None
    heldout_about: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """A model declared for export and archiving.

    name:       archive and endpoint name (`/predictions/<name>`)
    revision:   the model's own revision; the archive version is `<project version>-r<revision>`
    factory:    builds (or trains) the eager module and its example inputs; heavy imports go inside it
    handler:    the handler file that serves it, relative to the project root
    tolerance:  largest allowed max-abs difference between eager and traced outputs
    freeze:     run `torch.jit.freeze` on the traced module (folds weights as constants)
    script:     compile with `torch.jit.script` instead of tracing: for models whose control flow depends on the
                data (detectors: proposals, NMS), which a trace would freeze to the example's path
    variants:   further exports (export/variants.py): int8, onnx, onnx-int8, aotinductor
    int8:       "static" (calibrated, for CNNs) or "dynamic" (Linear layers, for transformers)
    int8_bound: the export-time quality metrics to (within bound, the bound in words), recorded in export.json
    accuracy:   (measure, minimum) that every served variant must keep against fp32 on the held-out inputs, on
                the machine that serves it: ("top1_agreement", 0.99) or ("min_cosine", 0.99)
    """

    name: str
    revision: int
    factory: Callable[[], PreparedModel]
    handler: str
    tolerance: float = 1e-5
    freeze: bool = False
    strict_trace: bool = True
    script: bool = False
    description: str = ""
    variants: tuple[str, ...] = ()
    int8: str = "static"
    int8_bound: Callable[[dict[str, float]], tuple[bool, str]] | None = None
    accuracy: tuple[str, float] | None = None


@dataclass(frozen=True)
class ExportReport:
    model: str
    revision: int
    torchscript_file: str
    parity_max_abs_diff: float
    tolerance: float
    input_shapes: list[list[int]]
    metrics: dict[str, float]
    torch_version: str
    extra_files: list[str] = field(default_factory=list)
    artefacts: dict[str, Any] = field(default_factory=dict)
