"""Trace a declared model to TorchScript, check parity on held-out inputs, write a report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from export.spec import ExportError, ExportReport, ModelSpec, PreparedModel
from export.variants import export_variants
from handlers.accuracy import HELDOUT_FILE, heldout_file


def _outputs(result: object) -> list[torch.Tensor]:
    """Flatten a model's output (tensor, tuple, list or dict of tensors) into a list."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for key in sorted(result) for t in _outputs(result[key])]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _outputs(item)]
    raise ExportError(f"model output of type {type(result).__name__} is not a tensor, tuple, list or dict")


def max_abs_difference(eager: torch.nn.Module, traced: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    with torch.inference_mode():
        expected = _outputs(eager(*inputs))
        actual = _outputs(traced(*inputs))
    if len(expected) != len(actual):
        raise ExportError(f"eager model returned {len(expected)} tensors, traced model {len(actual)}")
    worst = 0.0
    for e, a in zip(expected, actual, strict=True):
        if e.shape != a.shape:
            raise ExportError(f"output shape differs: eager {tuple(e.shape)}, traced {tuple(a.shape)}")
        worst = max(worst, (e.float() - a.float()).abs().max().item() if e.numel() else 0.0)
    return worst


def trace(spec: ModelSpec, prepared: PreparedModel) -> torch.jit.ScriptModule:
    module = prepared.module.eval()
    if spec.script:  # compiled from the source: every branch kept; parity is still checked in export_model
        scripted: torch.jit.ScriptModule = torch.jit.script(module)  # type: ignore[no-untyped-call]
        return torch.jit.freeze(scripted) if spec.freeze else scripted
    with torch.inference_mode(False), torch.no_grad():
        traced: torch.jit.ScriptModule = torch.jit.trace(  # type: ignore[no-untyped-call]
            module, prepared.example_inputs, strict=spec.strict_trace
        )
    if spec.freeze:
        traced = torch.jit.freeze(traced)
    follow_input_device(traced)
    return traced


def follow_input_device(traced: torch.jit.ScriptModule) -> int:
    """Replace the devices a trace recorded as constants (transformers' mask code calls `arange(...,
    device=input.device)`, which tracing on the CPU turns into `device="cpu"`) with the first input's device,
    so the program exported here also runs on a GPU. Returns how many constants were replaced."""
    graph = traced.graph
    torch._C._jit_pass_inline(graph)
    constants = [node for node in graph.nodes()
                 if node.kind() == "prim::Constant" and node.output().type().kind() == "DeviceObjType"]
    if not constants:
        return 0
    first_input = list(graph.inputs())[1]  # 0 is the module itself
    device = graph.create("prim::device", [first_input], 1)
    device.output().setType(torch._C.DeviceObjType.get())
    device.insertBefore(next(iter(graph.nodes())))
    for node in constants:
        node.output().replaceAllUsesWith(device.output())
        node.destroy()
    return len(constants)


def export_model(spec: ModelSpec, out_dir: Path, prepared: PreparedModel | None = None,
                 variants: tuple[str, ...] | None = None) -> ExportReport:
    """Export `spec` into `out_dir`: `<name>.pt`, `export.json`, when labelled `index_to_name.json`, and `variants`
    (default: every one the declaration lists; export/wanted.py picks them for `tsforge export`).

    Raises ExportError, and writes nothing, when eager and traced outputs differ by more than
    `spec.tolerance` on the held-out inputs.
    """
    prepared = prepared or spec.factory()
    traced = trace(spec, prepared)
    check = prepared.check_inputs or prepared.example_inputs
    diff = max_abs_difference(prepared.module, traced, check)
    if not diff <= spec.tolerance:  # also catches NaN
        raise ExportError(
            f"{spec.name}: traced output differs from eager output by {diff:.3g} "
            f"(max abs) on held-out inputs; the limit is {spec.tolerance:.0e}. "
            "The model likely has data-dependent control flow that tracing cannot capture."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if prepared.heldout and spec.accuracy:
        measure, minimum = spec.accuracy
        prepared.extra_files[HELDOUT_FILE] = heldout_file(measure, minimum, prepared.heldout, prepared.heldout_about)
    pt_file = out_dir / f"{spec.name}.pt"
    traced.save(str(pt_file))
    artefacts = export_variants(spec, prepared, out_dir, pt_file.name, variants)
    report = ExportReport(
        model=spec.name,
        revision=spec.revision,
        torchscript_file=pt_file.name,
        parity_max_abs_diff=diff,
        tolerance=spec.tolerance,
        input_shapes=[list(t.shape) for t in _outputs(prepared.example_inputs)],  # a list of images: each
        metrics=prepared.metrics,
        torch_version=torch.__version__,
        extra_files=sorted([*prepared.extra_files, *(entry["file"] for entry in artefacts.values())]),
        artefacts=artefacts,
    )
    (out_dir / "export.json").write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
    if prepared.labels is not None:
        mapping = {str(i): label for i, label in enumerate(prepared.labels)}
        (out_dir / "index_to_name.json").write_text(json.dumps(mapping, indent=2) + "\n")
    for name, content in prepared.extra_files.items():
        (out_dir / name).write_bytes(content)
    return report
