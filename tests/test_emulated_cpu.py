"""ONNX Runtime's int8 kernels on a CPU without AVX-512 or VNNI, emulated: its u8s8 kernels differ by CPU
(without VNNI they multiply-add into 16 bits and can saturate) and, unlike PyTorch and oneDNN, it has no
switch to cap the instruction set. So the int8 accuracy path runs under QEMU user mode with a CPU model that
has AVX2 and nothing newer (QEMU 7.2's TCG emulates up to AVX2: every model, `max` included, loses AVX-512),
and what it measures is judged with the product's own held-out measure and bound (handlers/accuracy.py).

`make test-isa` runs it with the capped-ISA suite; Debian's `qemu-user` package provides `qemu-x86_64`.
TSFORGE_QEMU_CPU picks another model (default Haswell-v4: AVX2, FMA, F16C; no AVX-512, no VNNI)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from handlers.accuracy import HeldOut
from tests.conftest import BUILD, built_archive

QEMU = shutil.which("qemu-x86_64")
CPU_MODEL = os.environ.get("TSFORGE_QEMU_CPU", "Haswell-v4")
SCRIPT = Path(__file__).with_name("emulated_int8.py")
#: the agreement with fp32 below which digits' int8 would be a broken export, not a CPU's rounding: the
#: realistic floor; the product's own promise (the declared bound, or refused at worker start) is checked too
FLOOR = 0.9

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is not installed (Debian: apt-get install -y qemu-user)"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86-64 CPU model for x86-64 wheels"),
]


def emulated(tmp_path: Path, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, object], np.ndarray, np.ndarray]:
    """Run tests/emulated_int8.py under qemu-x86_64 -cpu CPU_MODEL: its JSON report and both models' logits."""
    inputs, out = tmp_path / "digits.npz", tmp_path / "logits.npz"
    np.savez(inputs, x=(x.astype(np.float32) / 255.0)[:, None], y=y)
    digits = BUILD / "digits"
    command = [str(QEMU), "-cpu", CPU_MODEL, sys.executable, str(SCRIPT), "--fp32", str(digits / "digits.onnx"),
               "--int8", str(digits / "digits.int8.onnx"), "--inputs", str(inputs), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    logits = np.load(out)
    return report, logits["fp32"], logits["int8"]


def test_onnxruntime_int8_digits_under_an_emulated_cpu_without_avx512(tmp_path: Path, digits_split) -> None:
    built_archive("digits")
    _, _, x_test, y_test = digits_split
    started = time.monotonic()
    report, fp32, int8 = emulated(tmp_path, x_test, y_test)
    seconds = time.monotonic() - started

    # it ran emulated: cpuid as the process saw it is the model's (under qemu-user /proc/cpuinfo is the host's)
    features = set(report["cpu_features"])  # type: ignore[call-overload]
    assert "AVX2" in features, f"{CPU_MODEL}: {sorted(features)}"
    assert not features & {"AVX512F", "AVX512VNNI", "AVX512_SKX"}, f"not emulated without AVX-512: {sorted(features)}"
    assert report["inputs"] == len(x_test) == len(fp32) == len(int8)

    # the emulated fp32 session is the reference; it answers as fp32 TorchScript does natively
    native = torch.jit.load(str(BUILD / "digits" / "digits.pt"))  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        torchscript = native(torch.from_numpy(x_test).float().div(255.0).unsqueeze(1))
    assert float((fp32.argmax(1) == torchscript.argmax(1).numpy()).mean()) == 1.0

    # the figure, with the product's own measure and the bound digits declares in heldout.json
    held_out = HeldOut.read(BUILD / "digits")
    assert held_out is not None, "build/digits has no heldout.json"
    verdict = held_out.verdict(torch.from_numpy(fp32), torch.from_numpy(int8))
    assert verdict.value == pytest.approx(report["top1_agreement"], abs=1e-4)
    print(f"\nONNX Runtime {report['onnxruntime']} int8 digits under qemu-x86_64 -cpu {CPU_MODEL} "
          f"(no AVX-512/VNNI): {verdict}, {'within' if verdict.within else 'OUTSIDE'} the declared bound "
          f"({'served' if verdict.within else 'refused by the accuracy gate'}); int8 accuracy "
          f"{report['int8_accuracy']} vs fp32 {report['fp32_accuracy']}; {seconds:.1f} s")
    assert verdict.value >= FLOOR, f"{verdict}: below {FLOOR}, a broken int8 export rather than a CPU's rounding"
