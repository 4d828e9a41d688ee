"""Exports beside the fp32 TorchScript file, each checked before it is written into `export.json`:

    int8         post-training quantization: static (FX graph mode, x86 backend, calibrated on real
                 inputs) for CNNs, dynamic (Linear layers) for transformers; frozen TorchScript
    onnx         ONNX with a dynamic batch axis (and sequence axis for token inputs), parity-checked
                 against eager like the TorchScript trace
    onnx-int8    ONNX Runtime's static QDQ quantization of the ONNX file, calibrated on the same inputs
    aotinductor  `torch.export` then AOTInductor, compiled here into a `.pt2` package (C++ compiler needed
                 at export only); records the instruction set it was compiled for

Accuracy is measured through `handlers.runtimes`, the code the workers serve with, on the model's own
held-out inputs (`PreparedModel.quality`), and bounded by the declaration (`ModelSpec.int8_bound`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from export.spec import ExportError, ModelSpec, PreparedModel
from export.wanted import VARIANT_NAMES as VARIANT_NAMES  # one list of names, stdlib-readable for the Makefile
from handlers import runtimes
from tsforge import extras

log = logging.getLogger(__name__)
#: the (backend, precision) each export is served as
SERVED_AS = {"int8": ("torchscript", "int8"), "onnx": ("onnxruntime", "fp32"),
             "onnx-int8": ("onnxruntime", "int8"), "aotinductor": ("aotinductor", "fp32")}
SUFFIXES = {"int8": ".int8.pt", "onnx": ".onnx", "onnx-int8": ".int8.onnx", "aotinductor": ".pt2"}


def export_variants(spec: ModelSpec, prepared: PreparedModel, out_dir: Path, torchscript: str,
                    variants: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Write each of `variants` (default: `spec.variants`) into `out_dir`; returns export.json's `artefacts`."""
    artefacts: dict[str, Any] = {}
    builders: dict[str, Callable[[Path], dict[str, Any]]] = {
        "int8": lambda path: _int8(spec, prepared, path),
        "onnx": lambda path: _onnx(prepared, path),
        "onnx-int8": lambda path: _onnx_int8(prepared, out_dir / f"{spec.name}{SUFFIXES['onnx']}", path),
        "aotinductor": lambda path: _aotinductor(prepared, path),
    }
    for name in spec.variants if variants is None else variants:
        path = out_dir / f"{spec.name}{SUFFIXES[name]}"
        started = time.perf_counter()
        entry = {"file": path.name, **builders[name](path)}
        entry["export_s"] = round(time.perf_counter() - started, 2)
        artefacts[name] = entry
        reference = runtimes.Artefacts(out_dir, torchscript, {})
        current = runtimes.Artefacts(out_dir, torchscript, artefacts)
        entry.update(_checked(spec, prepared, reference, current, name))
        print(f"  {name}: {path.name} {entry}")
    return artefacts


def _checked(spec: ModelSpec, prepared: PreparedModel, reference: runtimes.Artefacts,
             current: runtimes.Artefacts, name: str) -> dict[str, Any]:
    """Parity for fp32 exports (max |diff| against eager, as the trace); the accuracy cost for int8 ones."""
    cpu = torch.device("cpu")
    backend, precision = SERVED_AS[name]
    runner = runtimes.load(runtimes.Variant(backend, precision), current, cpu)
    if precision == "fp32":
        inputs = prepared.check_inputs or prepared.example_inputs
        with torch.inference_mode():
            expected = prepared.module(*inputs).float()
            actual = runner(*inputs)
        diff = float((expected - actual).abs().max())
        # Another runtime sums in another order, and its rounding grows with the outputs' size (logits of a few
        # units differ by ~1e-4 between ONNX Runtime's and ATen's AVX2 kernels): the limit is relative to it.
        scale = max(1.0, float(expected.abs().max()))
        limit = spec.tolerance * 10 * scale
        if not diff <= limit:  # also catches NaN
            raise ExportError(f"{spec.name}: the {name} export differs from eager by {diff:.3g} (max abs); the "
                              f"limit is {limit:.3g} (10 x the model's tolerance {spec.tolerance:.0e}, times the "
                              f"largest output magnitude {scale:.3g} when above 1)")
        return {"parity_max_abs_diff": diff, "parity_limit": limit}
    if prepared.quality is None:
        return {"within_bound": False, "bound": "no quality check declared: never chosen by `auto`"}
    fp32 = runtimes.load(runtimes.Variant(), reference, cpu)
    metrics = prepared.quality(fp32, runner)
    ok, bound = spec.int8_bound(metrics) if spec.int8_bound else (False, "no bound declared")
    return {"quality": metrics, "bound": bound, "within_bound": ok}


def _int8(spec: ModelSpec, prepared: PreparedModel, path: Path) -> dict[str, Any]:
    module = copy.deepcopy(prepared.module).eval()
    if spec.int8 == "dynamic":
        quantized, chosen, total = _dynamic_int8(module, prepared.calibration or prepared.example_inputs)
        method = (f"dynamic int8, per-channel weights, {chosen} of {total} Linear layers (the least sensitive "
                  f"ones, while the output keeps cosine >= {DYNAMIC_MIN_COSINE} to fp32 on calibration inputs)")
    else:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        observed = prepare_fx(module, get_default_qconfig_mapping("x86"), prepared.example_inputs)
        calibration = prepared.calibration or prepared.example_inputs
        with torch.inference_mode():
            for start in range(0, len(calibration[0]), 8):
                observed(*(t[start : start + 8] for t in calibration))
        quantized = convert_fx(observed)
        method = f"static int8, FX graph mode, x86 backend, calibrated on {len(calibration[0])} real inputs"
    with torch.no_grad():
        traced = torch.jit.trace(quantized, prepared.example_inputs, strict=spec.strict_trace)  # type: ignore[no-untyped-call]
        frozen = torch.jit.freeze(traced.eval())
    frozen.save(str(path))
    return {"method": method}


#: mixed-precision target for dynamic int8 on the calibration inputs (held-out checks come after)
DYNAMIC_MIN_COSINE = 0.995


def _dynamic_int8(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.nn.Module, int, int]:
    """Dynamic int8 on the Linear layers that tolerate it: each layer's sensitivity is measured alone, then layers
    are quantized from the least sensitive on while the whole output stays within DYNAMIC_MIN_COSINE of fp32.
    Quantizing every layer of MiniLM this way drops its embeddings' cosine to 0.94."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    def agreement(layers: list[str]) -> float:
        quantized = quantize_dynamic(copy.deepcopy(module),  # type: ignore[no-untyped-call]
                                     dict.fromkeys(layers, per_channel_dynamic_qconfig), dtype=torch.qint8)
        with torch.inference_mode():
            out = quantized(*inputs).flatten(1)
        return float(torch.nn.functional.cosine_similarity(out, reference).min())

    with torch.inference_mode():
        reference = module(*inputs).flatten(1)
    layers = [name for name, child in module.named_modules() if isinstance(child, torch.nn.Linear)]
    ranked = sorted(layers, key=lambda name: -agreement([name]))
    chosen: list[str] = []
    for name in ranked:
        if agreement([*chosen, name]) >= DYNAMIC_MIN_COSINE:
            chosen.append(name)
    quantized = quantize_dynamic(module, dict.fromkeys(chosen, per_channel_dynamic_qconfig),  # type: ignore[no-untyped-call]
                                 dtype=torch.qint8)
    return quantized, len(chosen), len(layers)


#: the subject of a missing `onnx` extra's message (tsforge/extras.py)
ONNX_PURPOSE = "the ONNX export (variants onnx and onnx-int8)"


def _onnx(prepared: PreparedModel, path: Path) -> dict[str, Any]:
    extras.require("onnx", "onnx", ONNX_PURPOSE)  # torch.onnx.export writes the file with it
    extras.require("onnxruntime", "onnx", ONNX_PURPOSE)  # the parity check runs it
    names = [f"input{i}" if len(prepared.example_inputs) > 1 else "input" for i in range(len(prepared.example_inputs))]
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in zip(names, prepared.example_inputs, strict=True):
        axes[name] = {0: "batch"} if tensor.is_floating_point() else {0: "batch", 1: "sequence"}
    axes["output"] = {0: "batch"}
    # The TorchScript-based exporter: the dynamo one needs onnxscript and is slower to run here.
    torch.onnx.export(copy.deepcopy(prepared.module).eval(), prepared.example_inputs, str(path), input_names=names,
                      output_names=["output"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return {"opset": 17}


def _onnx_int8(prepared: PreparedModel, source: Path, path: Path) -> dict[str, Any]:
    if not source.is_file():
        raise ExportError("onnx-int8 needs the onnx export first: list 'onnx' before it in the variants")
    extras.require("onnxruntime", "onnx", ONNX_PURPOSE)
    extras.require("onnx", "onnx", ONNX_PURPOSE)  # ONNX Runtime's quantization tools edit the graph with it
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration = prepared.calibration or prepared.example_inputs
    import onnxruntime as ort

    names = [i.name for i in ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_inputs()]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{n: t[i : i + 1].numpy() for n, t in zip(names, calibration, strict=True)}
                                 for i in range(len(calibration[0]))])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    prepped = path.with_suffix(".prep.onnx")
    quant_pre_process(str(source), str(prepped))
    quantize_static(str(prepped), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepped.unlink()
    return {"method": f"ONNX Runtime static QDQ (u8 activations, s8 per-channel weights), calibrated on "
                      f"{len(calibration[0])} real inputs"}


def _aotinductor(prepared: PreparedModel, path: Path) -> dict[str, Any]:
    from torch._inductor import cpu_vec_isa

    # A batch of one would let torch.export specialise the batch size to the constant 1.
    example = tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in prepared.example_inputs)
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = tuple({0: batch} for _ in example)
    with torch.no_grad():
        program = torch.export.export(copy.deepcopy(prepared.module).eval(), example, dynamic_shapes=shapes)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs={"freezing": True})
    isa = str(cpu_vec_isa.pick_vec_isa())
    return {"device": "cpu", "cpu_isa": isa, "cpu_flags": required_flags(isa)}


def required_flags(isa: str) -> list[str]:
    """The `torch.cpu.get_capabilities()` flags a CPU needs to run code Inductor compiled for `isa`."""
    flags = []
    if "avx512" in isa:
        flags += ["avx512_f", "avx512_bw", "avx512_dq", "avx512_vl"]
    if "vnni" in isa:
        flags.append("avx512_vnni")
    if "avx2" in isa:
        flags += ["avx2", "fma3"]
    if "amx" in isa:
        flags.append("amx_tile")
    return flags
