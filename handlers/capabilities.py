"""What the worker's device can run fast: instruction sets on a CPU, compute capability on a GPU.

Read once per worker at start, from torch's own queries (`torch.cpu.get_capabilities`,
`torch.cuda.get_device_capability`), never from `/proc` or a hard-coded table of machines. The result
decides which precisions are worth measuring: bf16 on a CPU without AMX or AVX512-BF16 is emulated,
several times slower than fp32, so `precision: auto` never tries it there.

The hardware's flags are capped by what the kernels are allowed to use: `ATEN_CPU_CAPABILITY` (as torch
reports it in `torch.backends.cpu.get_cpu_capability()`) and `ONEDNN_MAX_CPU_ISA`. A host that caps
oneDNN at AVX2 runs bf16 convolutions emulated whatever its CPU has.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

#: the CPU flags that decide precision and backend, in the order reports show them
CPU_FLAGS = ("amx_tile", "amx_bf16", "amx_fp16", "amx_int8", "avx512_bf16", "avx512_fp16", "avx512_vnni",
             "avx_vnni", "avx512_f", "avx2")


@dataclass(frozen=True)
class Capabilities:
    """device: "cpu" or "cuda"; flags: the CPU flags above that are present; cuda: (major, minor) or None."""

    device: str
    name: str
    flags: frozenset[str] = field(default_factory=frozenset)
    cuda: tuple[int, int] | None = None

    def has(self, *flags: str) -> bool:
        """True when any of `flags` is present."""
        return any(flag in self.flags for flag in flags)

    @property
    def native_bf16(self) -> bool:
        if self.device == "cuda":
            return self.cuda is not None and self.cuda >= (8, 0)
        return self.has("amx_bf16", "avx512_bf16")

    @property
    def native_fp16(self) -> bool:
        if self.device == "cuda":
            return self.cuda is not None and self.cuda >= (7, 0)
        return self.has("amx_fp16", "avx512_fp16")

    @property
    def fast_int8(self) -> bool:
        """int8 kernels (fbgemm/oneDNN on x86, ONNX Runtime's MLAS) beat fp32 with VNNI or AMX, and still
        with AVX2 / AVX512 through 16-bit accumulation; only a CPU without AVX2 has no fast path."""
        return self.device == "cpu" and self.has("amx_int8", "avx512_vnni", "avx_vnni", "avx512_f", "avx2")

    def precisions(self) -> list[str]:
        """The precisions worth measuring on this device, fp32 first."""
        found = ["fp32"]
        if self.native_bf16:
            found.append("bf16")
        if self.native_fp16 and self.device == "cuda":  # CPU fp16 convolutions fall back to slow paths
            found.append("fp16")
        return found

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "name": self.name, "flags": sorted(self.flags),
                "cuda_capability": list(self.cuda) if self.cuda else None}


def detect(device: torch.device) -> Capabilities:
    """The capabilities of `device` as torch reports them."""
    if device.type == "cuda":
        index = device.index or 0
        return Capabilities("cuda", torch.cuda.get_device_name(index),
                            cuda=tuple(torch.cuda.get_device_capability(index)))  # type: ignore[arg-type]
    return this_cpu()


def cpu_capabilities(reported: Mapping[str, Any], *, aten: str | None = None,
                     onednn: str | None = None) -> Capabilities:
    """From `torch.cpu.get_capabilities()`'s dictionary (or a faked one in tests), less the flags that the
    ATen capability (`aten`, e.g. "AVX2") or oneDNN's ISA cap (`onednn`, e.g. "AVX2") keep kernels from using."""
    flags = {flag for flag in CPU_FLAGS if reported.get(flag) is True}
    for cap in (aten, onednn):
        flags -= capped_flags(cap)
    return Capabilities("cpu", str(reported.get("cpu_name") or "cpu"), frozenset(flags))


#: the flags an ISA cap (ATen's capability or oneDNN's ONEDNN_MAX_CPU_ISA) leaves unused, by the cap's prefix;
#: the first prefix that matches wins, so the longer names come first
_AMX = {"amx_tile", "amx_bf16", "amx_fp16", "amx_int8"}
_AVX512 = {"avx512_f", "avx512_vnni", "avx512_bf16", "avx512_fp16"} | _AMX
_CAPS: tuple[tuple[str, set[str]], ...] = (
    ("AVX512_CORE_AMX_FP16", set()), ("AVX10_1_512_AMX_FP16", set()),
    ("AVX512_CORE_AMX", {"amx_fp16"}), ("AVX10_1_512_AMX", {"amx_fp16"}),
    ("AVX512_CORE_FP16", _AMX), ("AVX10_1_512", _AMX),
    ("AVX512_CORE_BF16", {"avx512_fp16"} | _AMX), ("AVX512_CORE_VNNI", {"avx512_bf16", "avx512_fp16"} | _AMX),
    ("AVX512_CORE", _AVX512 - {"avx512_f"}), ("AVX512", set()),  # ATen's AVX512 is its highest level
    ("AVX2_VNNI", _AVX512), ("AVX2", _AVX512 | {"avx_vnni"}),
    ("AVX", _AVX512 | {"avx_vnni", "avx2"}), ("SSE", _AVX512 | {"avx_vnni", "avx2"}),
    ("DEFAULT", _AVX512 | {"avx_vnni", "avx2"}),
)


def capped_flags(cap: str | None) -> set[str]:
    """The flags a cap excludes; none for no cap or oneDNN's ALL / DEFAULT."""
    name = (cap or "").strip().upper()
    if not name or name == "ALL":
        return set()
    return next((set(flags) for prefix, flags in _CAPS if name.startswith(prefix)), set())


def this_cpu() -> Capabilities:
    """This CPU as its kernels may use it: torch's flags less what ATen's capability and oneDNN's cap exclude.
    oneDNN's DEFAULT means no cap, ATen's DEFAULT means no vector ISA at all, hence the two spellings."""
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cpu_capabilities(torch.cpu.get_capabilities(), aten=torch.backends.cpu.get_cpu_capability(),
                            onednn=None if (onednn or "").upper() == "DEFAULT" else onednn)


def fingerprint(device: torch.device) -> dict[str, Any]:
    """What a measured choice depends on besides the archive: every CPU flag torch reports, the caps on them,
    the GPU, and the versions of the libraries that run the variants. A change of any starts a new measurement."""
    reported = {k: v for k, v in torch.cpu.get_capabilities().items() if v is True or k == "cpu_name"}
    versions: dict[str, str | None] = {"torch": torch.__version__}  # with its build: +cpu, +cu130
    for package in ("onnxruntime", "onnx"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    gpu = detect(device).to_json() if device.type == "cuda" else None
    return {"cpu": reported, "aten": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
            "gpu": gpu, "versions": versions}
