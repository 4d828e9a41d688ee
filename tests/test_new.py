"""`tsforge new` from three kinds of source, end to end: new -> export -> archive -> a real TorchServe -> answers.

Everything is written under a temp folder (`--root`, TSFORGE_MODELS), never into the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from export.models.resnet import imagenet_tensor, jpeg, real_inputs, sample_photos
from export.sources import Source
from tests.conftest import ROOT, StartServer, tsforge

pytestmark = pytest.mark.integration

FACTORY = '''
import torch
from torch import nn


def build():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def feature_map():
    return nn.Conv2d(3, 4, 3)
'''

LABELS = [f"class_{i}" for i in range(10)]




def make_sources(root: Path) -> dict[str, list[str]]:
    """The three sources in the user's tree, and the `tsforge new` arguments of each."""
    import torchvision

    torch.manual_seed(1)
    mnv3 = torchvision.models.mobilenet_v3_small(weights=None)
    # Random MobileNetV3 weights shrink every activation to ~1e-8 (logits tied to float noise): batch-norm statistics
    # taken on real photos make it a random but well-conditioned network, whose top-1 float noise does not flip.
    for module in mnv3.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average
    with torch.no_grad():
        mnv3.train()(real_inputs(16, seed=5))
    torch.save(mnv3.state_dict(), root / "mnv3.pth")
    torch.manual_seed(2)
    scripted = torch.jit.script(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 7, stride=8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 5)))
    scripted.save(str(root / "scripted.pt"))  # type: ignore[no-untyped-call]
    (root / "net.py").write_text(FACTORY)
    namespace: dict[str, Any] = {}
    exec(FACTORY, namespace)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(namespace["build"]().eval(), (torch.randn(2, 3, 224, 224),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, root / "program.pt2")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return {
        "mnv3": ["--from", "torchvision:mobilenet_v3_small", "--weights", str(root / "mnv3.pth")],
        "scripted": ["--from", str(root / "scripted.pt")],
        "factory": ["--from", f"{root / 'net.py'}:build", "--labels", str(root / "labels.txt")],
        "program": ["--from", str(root / "program.pt2"), "--labels", str(root / "labels.txt")],
    }


@pytest.fixture(scope="module")
def user_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], dict[str, float]]:
    """new -> export -> archive for each source, into one temp tree; the seconds each took."""
    root = tmp_path_factory.mktemp("user_tree")
    env = {**os.environ, "TSFORGE_MODELS": str(root / "models")}
    seconds = {}
    for name, args in make_sources(root).items():
        start = time.monotonic()
        tsforge("new", name, "--task", "image-classification", *args, "--root", str(root), env=env)
        tsforge("export", name, "--out-dir", str(root / "build"), env=env)
        tsforge("archive", name, "--build-dir", str(root / "build"), "--store", str(root / "store"),
                "--config", str(root / "config" / "models" / f"{name}.yaml"), env=env)
        seconds[name] = time.monotonic() - start
    return root, env, seconds


def test_new_writes_a_discovered_declaration(user_tree: tuple[Path, dict[str, str], dict[str, float]]) -> None:
    root, env, _ = user_tree
    for name in ("mnv3", "scripted", "factory", "program"):
        assert (root / "models" / f"{name}.py").is_file()
        assert (root / "config" / "models" / f"{name}.yaml").is_file()
        assert (root / "store" / f"{name}.mar").is_file()
    assert sorted(p.name for p in (root / "examples" / "mnv3").iterdir()) == ["china.jpg", "flower.jpg"]
    assert not (ROOT / "models" / "mnv3.py").exists()  # nothing written into the checkout
    clash = root / "other"
    (clash / "models").mkdir(parents=True)
    (clash / "models" / "again.py").write_text((root / "models" / "mnv3.py").read_text().replace(
        "ROOT = Path(__file__).resolve().parent.parent", f"ROOT = Path({str(root)!r})"))
    clashing = {**env, "TSFORGE_MODELS": os.pathsep.join([str(root / "models"), str(clash / "models")])}
    result = tsforge("export", "mnv3", "--out-dir", str(root / "clash-build"), env=clashing, check=False)
    assert result.returncode != 0
    assert "declared twice" in result.stderr and "mnv3.py" in result.stderr and "again.py" in result.stderr


def fp32_top1(root: Path, name: str, photo: bytes) -> str:
    """The label the in-process fp32 model (the declaration's own source) gives the photo."""
    return fp32_top_k(root, name, photo, 1)[0]


def fp32_top_k(root: Path, name: str, photo: bytes, k: int) -> list[str]:
    import json

    from export.registry import get

    os.environ["TSFORGE_MODELS"] = str(root / "models")
    try:
        prepared = get(name).factory()
    finally:
        del os.environ["TSFORGE_MODELS"]
    with torch.inference_mode():
        top = prepared.module(imagenet_tensor(photo).unsqueeze(0))[0].topk(k).indices.tolist()
    labels = json.loads((root / "build" / name / "index_to_name.json").read_text())
    assert prepared.labels == [labels[str(i)] for i in range(len(labels))]
    return [str(labels[str(i)]) for i in top]


def test_served_answers_match_fp32(user_tree: tuple[Path, dict[str, str], dict[str, float]],
                                   start_server: StartServer) -> None:
    root, _, seconds = user_tree
    names = ["mnv3", "scripted", "factory", "program"]
    start = time.monotonic()
    server = start_server(names, store=root / "store")
    started = time.monotonic() - start
    photo = jpeg(sample_photos()["china.jpg"])
    first: dict[str, float] = {}
    for name in names:
        url = f"{server.url('inference')}/predictions/{name}"
        sent = time.monotonic()
        answer = requests.post(url, data=photo, timeout=120)
        first[name] = round(time.monotonic() - sent, 2)
        assert answer.status_code == 200, answer.text
        label = answer.json()["label"]
        described = requests.get(f"{server.url('management')}/models/{name}?customized=true", timeout=10).json()
        metadata = described[0].get("customizedMetadata") or {}
        selection = metadata.get("selection", metadata) if isinstance(metadata, dict) else metadata
        print(name, {k: selection.get(k) for k in ("backend", "precision")} if isinstance(selection, dict) else "")
        expected = fp32_top1(root, name, photo)
        if isinstance(selection, dict) and selection.get("precision") not in (None, "fp32"):
            # a reduced precision that passed the accuracy gate may swap the test network's two nearly tied top
            # classes on this one photo (random weights: the margin is 3% of the logit): among fp32's top 3
            assert label in fp32_top_k(root, name, photo, 3), (name, selection, answer.json())
        else:
            assert label == expected, (name, selection, answer.json())
        bad = requests.post(url, data=b"not an image at all", timeout=60)
        assert 400 <= bad.status_code < 500, bad.text
        assert "message" in bad.json()
    assert "class_" in requests.post(f"{server.url('inference')}/predictions/factory", data=photo,
                                     timeout=60).json()["label"]
    print("\nnew + export + archive seconds:", {k: round(v, 1) for k, v in seconds.items()},
          f"server start with all {len(names)}: {started:.1f} s; first answer seconds: {first}")


@pytest.mark.parametrize(("args", "expected"), [
    (["--from", "/nonexistent/model.pt"], "does not exist"),
    (["--from", "torchvision:no_such_net"], "torchvision has no classification model"),
    (["--from", "{root}/net.py:feature_map"], "expects [N, classes]"),
    (["--from", "{root}/net.py:missing"], "has no function"),
    (["--from", "model.onnx"], "cannot tell what source"),
])
def test_bad_sources_are_one_line_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "net.py").write_text(FACTORY)
    args = [a.replace("{root}", str(tmp_path)) for a in args]
    result = subprocess.run([sys.executable, "-m", "tsforge", "new", "bad", "--task", "image-classification", *args,
                             "--root", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tsforge new: error:") and expected in lines[0], result.stderr
    assert not (tmp_path / "models").exists()


def test_tensor_task_writes_shape_and_dtype(tmp_path: Path) -> None:
    torch.jit.script(torch.nn.Flatten()).save(str(tmp_path / "flat.pt"))  # type: ignore[no-untyped-call]
    result = subprocess.run([sys.executable, "-m", "tsforge", "new", "flat", "--task", "tensor", "--from",
                             str(tmp_path / "flat.pt"), "--input-shape", "1,8,8", "--root", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    import yaml

    config = yaml.safe_load((tmp_path / "config" / "models" / "flat.yaml").read_text())
    assert config["handler"]["input"] == {"shape": [1, 8, 8], "dtype": "float32"}
    assert config["v2"]["outputs"][0]["shape"] == [-1, 64]
    assert len(list((tmp_path / "examples" / "flat").glob("*.json"))) == 3
    assert Source(str(tmp_path / "flat.pt")).kind == "torchscript"
