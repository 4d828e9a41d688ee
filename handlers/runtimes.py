"""The ways a worker can run an exported model: a `Variant` (backend x precision x fusion) and its loader.

    torchscript   the `.pt` export (fp32), cast to bf16/fp16 and frozen at load (or, for programs whose
                  traced constants pin fp32, run under autocast); or the int8 `.int8.pt` export
                  (post-training static quantization, already frozen)
    onnxruntime   the `.onnx` export (fp32) or its int8 quantization, in an ONNX Runtime session
                  (CPU provider; CUDA provider where present)
    aotinductor   the `.pt2` package compiled ahead of time by AOTInductor at export: no compiler and no
                  compile time at worker start

Every loaded variant is a `Runner`: float32 tensors in (on the worker's device), float32 tensors out.
Casts, memory format and the oneDNN fuser switch stay inside it, so callers and the choice in
`handlers.autoselect` compare variants on equal terms.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("torchscript", "onnxruntime", "aotinductor")
#: export.json `artefacts` keys, by (backend, precision): what file a variant loads
ARTEFACT_KEYS = {("torchscript", "int8"): "int8", ("onnxruntime", "fp32"): "onnx",
                 ("onnxruntime", "int8"): "onnx-int8", ("aotinductor", "fp32"): "aotinductor"}
#: how a TorchScript program runs in bf16/fp16: weights cast and frozen (fastest), or under autocast, for
#: traced programs that pin fp32 in their constants (MiniLM's attention mask)
CASTS = ("cast", "autocast")
Runner = Callable[..., torch.Tensor]


class VariantUnavailable(RuntimeError):
    """The archive lacks the file, or this worker the library or instruction set, that a variant needs."""


@dataclass(frozen=True, order=True)
class Variant:
    backend: str = "torchscript"
    precision: str = "fp32"
    fusion: bool = False  # TorchScript's oneDNN Graph fuser (CPU)

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.precision}" + ("+fusion" if self.fusion else "")

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision, "fusion": self.fusion}


@dataclass(frozen=True)
class Artefacts:
    """The exported files an archive carries, from its `export.json`: the fp32 TorchScript file always,
    the others where the export made them (with what they cost in accuracy)."""

    root: Path
    torchscript: str
    extra: dict[str, dict[str, Any]]

    @classmethod
    def read(cls, root: Path, torchscript: str) -> Artefacts:
        report = root / "export.json"
        extra = json.loads(report.read_text()).get("artefacts", {}) if report.is_file() else {}
        return cls(root, torchscript, {k: v for k, v in extra.items() if (root / v["file"]).is_file()})

    def entry(self, variant: Variant) -> dict[str, Any] | None:
        """The export.json entry of a variant's file; None for the fp32 TorchScript file itself."""
        key = ARTEFACT_KEYS.get((variant.backend, variant.precision))
        return None if key is None else self.extra.get(key)

    def has(self, variant: Variant) -> bool:
        # fp32/bf16/fp16 TorchScript are all cast from the one fp32 file at load
        return (variant.backend == "torchscript" and variant.precision in PRECISIONS) or bool(self.entry(variant))

    def path(self, variant: Variant) -> Path:
        if not self.has(variant):
            raise VariantUnavailable(f"the archive has no file for {variant.name}")
        entry = self.entry(variant)
        return self.root / (entry["file"] if entry else self.torchscript)


@contextlib.contextmanager
def onednn_fusion(enabled: bool) -> Iterator[None]:
    """TorchScript's oneDNN Graph fuser is a process-wide switch; turn it on only around our own calls."""
    previous = bool(torch.jit.onednn_fusion_enabled())  # type: ignore[no-untyped-call]
    torch.jit.enable_onednn_fusion(enabled)
    try:
        yield
    finally:
        torch.jit.enable_onednn_fusion(previous)


def compile_for_serving(model: torch.jit.ScriptModule, dtype: torch.dtype, channels_last: bool,
                        device: torch.device | None = None) -> torch.jit.ScriptModule:
    """Cast, re-layout, then freeze: freezing folds the weights into constants (and conv+batch-norm into one
    conv), after which `.to(dtype)` or `.to(memory_format=...)` no longer reach them, so the order matters.

    On CUDA the frozen program also goes through `optimize_for_inference`, which fuses convolution + add +
    ReLU into single cuDNN calls: as fast as `torch.compile` without a compile at worker start (the figures:
    docs/benchmarks-gpu.md, docs/data/gpu-resnet50.json). On a CPU it would convert to
    MKL-DNN layouts instead, which the oneDNN fusion switch and int8 already cover, so it is not applied there."""
    model = model.eval().to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    frozen: torch.jit.ScriptModule = torch.jit.freeze(model)
    if device is not None and device.type == "cuda":
        frozen = torch.jit.optimize_for_inference(frozen)
    return frozen


def load(variant: Variant, artefacts: Artefacts, device: torch.device, *, channels_last: bool = False,
         cast: str = "cast") -> Runner:
    """A runner for `variant`; raises VariantUnavailable when it cannot run here."""
    path = artefacts.path(variant)
    if variant.backend == "torchscript":
        return _torchscript(variant, path, device, channels_last, autocast=cast == "autocast")
    if variant.backend == "onnxruntime":
        return _onnxruntime(path, device)
    if variant.backend == "aotinductor":
        return _aotinductor(path, device, artefacts.entry(variant) or {})
    raise VariantUnavailable(f"unknown backend {variant.backend!r}; expected one of {', '.join(BACKENDS)}")


def _torchscript(variant: Variant, path: Path, device: torch.device, channels_last: bool,
                 autocast: bool) -> Runner:
    module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
    dtype = PRECISIONS.get(variant.precision, torch.float32)
    mixed = autocast and dtype != torch.float32
    if variant.precision == "int8":
        if device.type != "cpu":
            raise VariantUnavailable("int8 TorchScript (fbgemm/oneDNN quantized kernels) runs on the CPU only")
        module = module.eval()  # the quantized program takes float input and quantizes it itself
    else:
        module = compile_for_serving(module, torch.float32 if mixed else dtype, channels_last, device)
    fuse = variant.fusion and device.type == "cpu"
    input_dtype = torch.float32 if mixed or variant.precision == "int8" else dtype

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        cast = [prepare(t, input_dtype, channels_last) for t in inputs]
        with onednn_fusion(fuse), torch.autocast(device.type, dtype=dtype, enabled=mixed):
            output: torch.Tensor = module(*cast)
        return output.float()

    return run


def prepare(tensor: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """A floating input in `dtype`, and NHWC when `channels_last` (4-d only); token ids pass unchanged."""
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if channels_last and tensor.dim() == 4:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def _onnxruntime(path: Path, device: torch.device) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError:
        raise VariantUnavailable("onnxruntime is not installed in the worker's environment") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the worker's thread budget, as torch's
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise VariantUnavailable("this onnxruntime build has no CUDA execution provider")
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs, strict=True)}
        return torch.from_numpy(session.run(None, feed)[0]).float().to(device)

    return run


def _aotinductor(path: Path, device: torch.device, entry: dict[str, Any]) -> Runner:
    wanted = entry.get("device", "cpu")
    if wanted != device.type:
        raise VariantUnavailable(f"the AOTInductor package was compiled for {wanted}, the worker runs on {device}")
    missing = sorted(set(entry.get("cpu_flags", [])) - cpu_flags()) if device.type == "cpu" else []
    if missing:
        raise VariantUnavailable(f"the AOTInductor package was compiled for {entry.get('cpu_isa')}; this CPU "
                                 f"lacks {', '.join(missing)}")
    import torch._inductor

    compiled = torch._inductor.aoti_load_package(str(path))

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = compiled(*inputs)
        return output.float()

    return run


def cpu_flags() -> set[str]:
    """This CPU's flags as torch reports them (no compiler needed, unlike Inductor's own ISA probe)."""
    return {name for name, present in torch.cpu.get_capabilities().items() if present is True}
