"""scikit-learn is the `examples` extra: without it, `tsforge new --task image-classification` says so in one line
(naming the extra and `--examples`), or takes the user's example images, and the export calibrates and checks on
views of them. scikit-learn is blocked in a subprocess (`sys.modules["sklearn"] = None`), as if not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from export.models.resnet import jpeg, sample_photos
from tests.conftest import ROOT

WITHOUT_SKLEARN = ("import sys; sys.modules['sklearn'] = None; from tsforge._main import main; "
                   "sys.exit(main(sys.argv[1:]))")
FACTORY = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 7, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))
"""


def tsforge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_SKLEARN, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_without_scikit_learn_new_names_the_extra_and_examples(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(FACTORY)
    done = tsforge("new", "tiny", "--task", "image-classification", "--from", f"{tmp_path / 'net.py'}:build",
                   "--root", str(tmp_path))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "scikit-learn" in lines[0] and "pip install 'tsforge[examples]'" in lines[0] and "--examples" in lines[0]
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_without_scikit_learn_new_and_export_take_the_users_images(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(FACTORY)
    photos = sample_photos()  # here, with scikit-learn: the test's own images
    for name, photo in photos.items():
        (tmp_path / name).write_bytes(jpeg(photo[::2, ::2]))
    images = [str(tmp_path / name) for name in photos]
    done = tsforge("new", "tiny", "--task", "image-classification", "--from", f"{tmp_path / 'net.py'}:build",
                   "--variants", "none", "--examples", *images, "--root", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "examples" / "tiny").iterdir()) == sorted(photos)
    env = {**os.environ, "TSFORGE_MODELS": str(tmp_path / "models")}
    done = tsforge("export", "tiny", "--out-dir", str(tmp_path / "build"), env=env)
    assert done.returncode == 0, done.stderr
    heldout = json.loads((tmp_path / "build" / "tiny" / "heldout.json").read_text())
    assert heldout["about"] == "64 views (crops, scales, mirror images) of the 2 example images"
    bad = tsforge("new", "other", "--task", "image-classification", "--from", f"{tmp_path / 'net.py'}:build",
                  "--examples", str(tmp_path / "net.py"), "--root", str(tmp_path))
    assert bad.returncode == 2 and "expected an existing" in bad.stderr


def test_the_digits_example_names_the_extra() -> None:
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "from export.models import digits\n"
            "from tsforge.extras import MissingExtra\n"
            "try:\n    digits.load_split()\nexcept MissingExtra as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("the digits example (scikit-learn's 8x8 digits) needs the optional package "
                                   "scikit-learn: pip install 'tsforge[examples]'")
