"""`make test-gpu`'s carry folder: what the GPU host lacks, gathered here (loadtest/gpu_smoke.py reads it there).

The device tool carries at most 64 MiB, so only what the host cannot make itself travels: TorchServe and a Java
runtime (the shared bundle script's `ts-bundle.txz`, about 36 MiB), the wheels of the pure-Python packages the
project imports and the host lacks, pinned to this venv's versions (plus tokenizers, built for the host's Python),
and data in place of scikit-learn. The models are exported there, by the host's own torch.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_BYTES = 64 * 2**20
HOST_PYTHON = "3.12"  # the GPU host's (../shared/device/README.md)
#: the host has torch, numpy, Pillow, pyyaml, psutil, aiohttp and grpcio; these it lacks
WHEELS = ("orjson", "requests", "urllib3", "idna", "certifi", "charset-normalizer", "pytest", "pluggy", "iniconfig",
          "packaging", "pygments", "pytest-timeout", "tokenizers")
#: the shared script that builds ts-bundle.txz into <repo>/.devcarry/ (TS_BUNDLE_SCRIPT replaces it)
BUNDLE_SCRIPT = Path(os.environ.get("TS_BUNDLE_SCRIPT",
                                    ROOT.parent / "shared" / "device" / "make-torchserve-bundle.sh"))
BUNDLE = "ts-bundle.txz"


def bundle(carry: Path) -> None:
    target = carry / BUNDLE
    if target.is_file():
        return
    built = ROOT / ".devcarry" / BUNDLE
    if not built.is_file():
        if not BUNDLE_SCRIPT.is_file():
            raise SystemExit(f"no {BUNDLE}: neither {built} nor the script that builds it ({BUNDLE_SCRIPT}; set "
                             "TS_BUNDLE_SCRIPT)")
        print(f"building {BUNDLE} (about three minutes of xz)", flush=True)
        subprocess.run(["bash", str(BUNDLE_SCRIPT)], cwd=ROOT, check=True, timeout=1800)
    shutil.copy2(built, target)


def wheels(carry: Path) -> None:
    folder = carry / "wheels"
    pinned = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    stamp = folder / "pinned.txt"
    if stamp.is_file() and stamp.read_text().split() == pinned:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", HOST_PYTHON, "--platform", "manylinux2014_x86_64", "--platform",
                    "manylinux_2_17_x86_64", "-d", str(folder), *pinned], check=True, timeout=600)
    stamp.write_text("\n".join(pinned) + "\n")


def data(carry: Path) -> None:
    from sklearn.datasets import load_sample_images

    from export.models.digits import save_split
    from export.models.resnet import PHOTO_FILES

    photos = carry / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for path in load_sample_images().filenames:  # the JPEG files scikit-learn reads, as they are
        if Path(path).name in PHOTO_FILES:
            shutil.copy2(path, photos / Path(path).name)
    save_split(str(carry / "digits-split.npz"))


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def prepare(carry: Path) -> int:
    carry.mkdir(parents=True, exist_ok=True)
    bundle(carry)
    wheels(carry)
    data(carry)
    total = size(carry)
    if total > LIMIT_BYTES:
        print(f"error: {carry} holds {total / 2**20:.1f} MiB, over the device tool's {LIMIT_BYTES // 2**20} MiB",
              file=sys.stderr)
        return 1
    where = carry.relative_to(ROOT) if carry.is_relative_to(ROOT) else carry
    print(f"{where}: {total / 2**20:.1f} MiB of {LIMIT_BYTES // 2**20}. For the device tool, one call:\n"
          f"  carry:   [\"{where}\"]\n"
          f"  command: python3 -m loadtest.gpu_smoke run --carry {where} --out $OUT\n"
          f"  timeout_s: 600 (kind: nvidia-h100-x1; -x2 / -x4 also check that the workers spread over every GPU)\n"
          f"It prints torch and the GPUs, and writes $OUT/test-gpu.json after every step.")
    return 0
