"""ONNX Runtime's fp32 and int8 digits models on the held-out set, meant to run under an emulated CPU
(`qemu-x86_64 -cpu Haswell-v4 .venv/bin/python tests/emulated_int8.py ...`): ONNX Runtime picks its int8
kernels (u8s8 with or without VNNI, AVX2 or AVX-512) from cpuid and has no switch to cap them, so the only way
to see what a CPU without VNNI / AVX-512 makes of an int8 model, on a machine that has them, is to emulate one.

numpy and onnxruntime only: importing torch under emulation would cost a minute. The inputs come as an `.npz`
(`x`: float32 (N, 1, 8, 8), `y`: int64 labels); the logits of both models go to `--out` (`.npz`) for the
caller to judge with the product's own measure; one JSON line on stdout says what this process saw:

    cpu_features     the x86 features present as this process sees them (numpy's cpuid probe: under
                     qemu-user, the emulated model's, not the host's; /proc/cpuinfo would be the host's)
    top1_agreement   the share of held-out rows whose int8 top class is fp32's
    fp32_accuracy, int8_accuracy, inputs, onnxruntime, seconds
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np


def cpu_features() -> list[str]:
    """The features cpuid (and xgetbv) report to this process, as numpy's runtime dispatch probes them."""
    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")  # numpy >= 2
    except ImportError:  # numpy 1.x
        umath = importlib.import_module("numpy.core._multiarray_umath")
    return sorted(name for name, present in umath.__cpu_features__.items() if present)


def logits(path: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # emulated threads only add contention
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    result: np.ndarray = session.run(None, {session.get_inputs()[0].name: x})[0]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", required=True, help="the fp32 ONNX model")
    parser.add_argument("--int8", required=True, help="its int8 quantization")
    parser.add_argument("--inputs", required=True, help=".npz with x (float32 N,1,8,8) and y (labels)")
    parser.add_argument("--out", required=True, help=".npz to write both models' logits to")
    args = parser.parse_args(argv)

    started = time.monotonic()
    import onnxruntime as ort

    data = np.load(args.inputs)
    x, y = np.ascontiguousarray(data["x"], dtype=np.float32), data["y"]
    fp32, int8 = logits(args.fp32, x), logits(args.int8, x)
    np.savez(args.out, fp32=fp32, int8=int8)
    report: dict[str, Any] = {
        "cpu_features": cpu_features(),
        "onnxruntime": ort.__version__,
        "inputs": len(x),
        "top1_agreement": round(float((fp32.argmax(1) == int8.argmax(1)).mean()), 4),
        "fp32_accuracy": round(float((fp32.argmax(1) == y).mean()), 4),
        "int8_accuracy": round(float((int8.argmax(1) == y).mean()), 4),
        "seconds": round(time.monotonic() - started, 2),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
