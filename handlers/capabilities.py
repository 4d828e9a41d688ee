"""What the worker's device can run fast: instruction sets on a CPU, compute capability on a GPU.

Read once per worker at start, from torch's own queries (`torch.cpu.get_capabilities`,
`torch.cuda.get_device_capability`), never from `/proc` or a hard-coded table of machines. The result
decides which precisions are worth measuring: bf16 on a CPU without AMX or AVX512-BF16 is emulated,
several times slower than fp32, so `precision: auto` never tries it there.
"""

from __future__ import annotations

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
    return cpu_capabilities(torch.cpu.get_capabilities())


def cpu_capabilities(reported: Mapping[str, Any]) -> Capabilities:
    """From `torch.cpu.get_capabilities()`'s dictionary (or a faked one in tests)."""
    flags = frozenset(flag for flag in CPU_FLAGS if reported.get(flag) is True)
    return Capabilities("cpu", str(reported.get("cpu_name") or "cpu"), flags)
