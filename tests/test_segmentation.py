"""Image segmentation: handlers/segmentation_handler.py on the segmenter archive (LR-ASPP MobileNetV3-Large).

In-process (the archive's handler with TorchServe's own Context): class maps equal the eager model's argmax at
the model's resolution and, scaled by nearest neighbour, at the image's; PNG and RLE decode to the same map;
shares sum to 1 and match the map; bad rows of a batch get their own 4xx. Through a real TorchServe: raw JPEG,
JSON base64 and v2 requests in one batch with a bad one, answers equal to the in-process reference."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from export.models import segmentation as seg_model
from export.models.resnet import jpeg, sample_photos
from handlers import segmentation
from handlers.segmentation_handler import resize_map
from loadtest.inprocess import LocalHandler
from loadtest.payloads import JSON_TYPE, Case, check, expectation
from tests.conftest import BUILD, ROOT, built_archive
from tests.test_images import bomb_png, with_orientation
from tsforge.packaging import archive
from tsforge.serving.server import TorchServe

#: whole models exported, trained or served from their own archives: `make test` runs these, test-fast does not
pytestmark = pytest.mark.slow

#: pixels whose class may differ between two runs of the same fp32 model (oneDNN fusion, batch composition and
#: memory layout change the rounding; random weights leave a few pixels within 1e-5 of a tie)
AGREEMENT = 0.999


@pytest.fixture(scope="module")
def mar() -> Path:
    return built_archive("segmenter")


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {name: jpeg(image) for name, image in sample_photos().items()}


@pytest.fixture(scope="module")
def eager_maps(photos: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """The eager model's argmax at 224 x 224 for each photo (the export's own factory: same seed, same weights)."""
    model = seg_model.build().module
    with torch.inference_mode():
        return {name: model(seg_model.segmenter_tensor(data).unsqueeze(0))[0].argmax(0).to(torch.uint8)
                for name, data in photos.items()}


_LOADED: dict[str, LocalHandler] = {}


def local_handler(mar: Path, overrides: dict[str, Any] | None = None) -> LocalHandler:
    """The archive's handler in-process, loaded once per settings (each load warms up and times its variants)."""
    key = json.dumps(overrides, sort_keys=True)
    if key not in _LOADED:
        _LOADED[key] = LocalHandler.load(mar, overrides)
    return _LOADED[key]


def answers(local: LocalHandler, bodies: list[Any]) -> list[tuple[int, Any]]:
    cases = [Case(f"c{n}", json.dumps(b).encode(), JSON_TYPE) if isinstance(b, (dict, list))
             else Case(f"c{n}", b, "image/jpeg") for n, b in enumerate(bodies)]
    return [(status, json.loads(body)) for status, body in local.handle(cases)]


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((np.asarray(a) == np.asarray(b)).mean())


def test_class_maps_equal_the_eager_argmax_at_both_resolutions(mar: Path, photos: dict[str, bytes],
                                                                eager_maps: dict[str, torch.Tensor]) -> None:
    at_model = local_handler(mar, {"output_size": "model"})
    at_image = local_handler(mar)
    names = list(photos)
    small = answers(at_model, [photos[n] for n in names])
    full = answers(at_image, [photos[n] for n in names])
    for name, (s_status, s_answer), (f_status, f_answer) in zip(names, small, full, strict=True):
        assert s_status == f_status == 200
        expected = eager_maps[name]
        assert len(torch.unique(expected)) > 3, "a hollow check: the model gives every pixel one class"
        assert (s_answer["width"], s_answer["height"]) == (224, 224)
        assert agreement(segmentation.answer_map(s_answer), expected.numpy()) >= AGREEMENT
        width, height = Image.open(io.BytesIO(photos[name])).size
        assert (f_answer["width"], f_answer["height"]) == (width, height)
        scaled = resize_map(expected, (width, height)).numpy()
        assert agreement(segmentation.answer_map(f_answer), scaled) >= AGREEMENT


def test_png_and_rle_give_the_same_map_and_shares_sum_to_one(mar: Path, photos: dict[str, bytes]) -> None:
    png = answers(local_handler(mar), list(photos.values()))
    rle = answers(local_handler(mar, {"output": "rle"}), list(photos.values()))
    labels = seg_model.voc_labels()
    for (_, as_png), (_, as_rle) in zip(png, rle, strict=True):
        assert "png" in as_png and "rle" in as_rle and "rle" not in as_png
        decoded = segmentation.answer_map(as_png)
        assert np.array_equal(decoded, segmentation.answer_map(as_rle))
        assert Image.open(io.BytesIO(base64.b64decode(as_png["png"]))).mode == "P"
        assert abs(sum(as_png["shares"].values()) - 1.0) < 1e-4
        counts = np.bincount(decoded.ravel(), minlength=len(labels)) / decoded.size
        assert as_png["shares"] == {labels[i]: round(float(c), 6) for i, c in enumerate(counts) if c} == \
            as_rle["shares"]
        assert list(as_png["shares"].values()) == sorted(as_png["shares"].values(), reverse=True)


def test_rle_and_png_round_trip_any_map() -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 7), (64, 48)]:
        class_map = rng.integers(0, 21, shape).astype(np.uint8)
        class_map[:, : shape[1] // 2] = 4  # runs as well as noise
        runs = segmentation.to_rle(class_map)
        assert np.array_equal(segmentation.from_rle(runs, shape[1], shape[0]), class_map)
        assert np.array_equal(segmentation.from_png(segmentation.to_png(class_map)), class_map)
    with pytest.raises(ValueError, match="cover"):
        segmentation.from_rle({"values": [1], "lengths": [5]}, 2, 2)


def test_bad_rows_get_their_own_4xx_and_the_good_rows_their_own_maps(mar: Path, photos: dict[str, bytes]) -> None:
    local = local_handler(mar)
    china, flower = photos["china.jpg"], photos["flower.jpg"]
    rotated = with_orientation(np.ascontiguousarray(np.rot90(sample_photos()["flower.jpg"], 1)), 6)
    b64 = base64.b64encode(flower).decode()
    batch = [china, b"\xff\xd8\xff not a jpeg", {"data": b64}, bomb_png(20_000, 20_000), rotated,
             {"instances": [b64, "@@@"]}, {"pixels": [1, 2]}]
    got = answers(local, batch)
    assert [status for status, _ in got] == [200, 400, 200, 413, 200, 400, 400]
    for status, body in got:
        if status != 200:
            assert body["code"] == status and body["type"] and body["message"], body
    # each good row got its own image's map: the same as answered alone
    alone = answers(local, [china, flower])
    assert agreement(segmentation.answer_map(got[0][1]), segmentation.answer_map(alone[0][1])) >= AGREEMENT
    assert agreement(segmentation.answer_map(got[2][1]), segmentation.answer_map(alone[1][1])) >= AGREEMENT
    # EXIF orientation 6 turns the stored image back: the map has the oriented image's size
    height, width = sample_photos()["flower.jpg"].shape[:2]
    assert (got[4][1]["width"], got[4][1]["height"]) == (width, height)
    assert "instance 1" in got[5][1]["message"]


def test_the_load_generator_checks_class_maps(mar: Path, photos: dict[str, bytes]) -> None:
    """The bench's check accepts the reference map and refuses another image's, in tsforge's and the stock
    handler's answer shapes."""
    local = local_handler(mar, {"output_size": "model"})
    (_, china), (_, flower) = answers(local, [photos["china.jpg"], photos["flower.jpg"]])
    expect = expectation(china)
    assert expect is not None and "class_map" in expect
    case = Case("china", photos["china.jpg"], "image/jpeg", expect)
    assert check(case, 200, json.dumps(china).encode()) is None
    assert "agree" in str(check(case, 200, json.dumps(flower).encode()))
    stock_shape = np.stack([segmentation.answer_map(china), np.full((224, 224), 0.5)], axis=2).tolist()
    assert check(case, 200, json.dumps(stock_shape).encode()) is None


# ---- through a real TorchServe ----

BATCH = 4
BATCH_DELAY_MS = 4000  # long enough that a burst of BATCH requests always lands in one batch


@pytest.fixture(scope="module")
def server(start_server, mar: Path, tmp_path_factory: pytest.TempPathFactory) -> TorchServe:
    """segmenter with batches of exactly BATCH and a long delay, so a burst shares one batch."""
    store = tmp_path_factory.mktemp("segmenter_store")
    config = yaml.safe_load((ROOT / "config" / "models" / "segmenter.yaml").read_text())
    config.update(batchSize=BATCH, maxBatchDelay=BATCH_DELAY_MS, minWorkers=1, maxWorkers=1)
    config_file = store / "segmenter-batching.yaml"
    config_file.write_text(yaml.safe_dump(config))
    archive.main(["segmenter", "--config", str(config_file), "--store", str(store), "--build-dir", str(BUILD)])
    started: TorchServe = start_server(["segmenter"], store=store)
    return started


@pytest.mark.integration
def test_served_raw_json_and_v2_answers_equal_the_reference_and_a_bad_one_fails_alone(
        server: TorchServe, mar: Path, photos: dict[str, bytes]) -> None:
    china, flower = photos["china.jpg"], photos["flower.jpg"]
    reference = [segmentation.answer_map(a) for _, a in answers(local_handler(mar), [china, flower])]
    base = server.url("inference")
    v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(flower).decode()]}]}
    calls = [("/predictions/segmenter", {"data": china, "headers": {"Content-Type": "image/jpeg"}}),
             ("/predictions/segmenter", {"json": {"data": base64.b64encode(flower).decode()}}),
             ("/predictions/segmenter", {"data": b"GIF89a broken", "headers": {"Content-Type": "image/gif"}}),
             ("/v2/models/segmenter/infer", {"json": v2})]
    assert len(calls) == BATCH
    started = time.monotonic()
    with ThreadPoolExecutor(BATCH) as pool:
        got = list(pool.map(lambda call: requests.post(base + call[0], timeout=120, **call[1]), calls))
    assert time.monotonic() - started < BATCH_DELAY_MS / 1000, "the requests did not share one batch"
    assert [r.status_code for r in got] == [200, 200, 400, 200], [r.text[:200] for r in got]
    assert got[2].json()["type"] == "undecodable_input"
    for response, expected in zip(got[:2], reference, strict=True):
        answer = response.json()
        assert response.headers["X-Model-Version"]
        assert agreement(segmentation.answer_map(answer), expected) >= AGREEMENT
    outputs = {o["name"]: o for o in got[3].json()["outputs"]}
    assert outputs["size"]["data"] == [640, 427] and outputs["size"]["shape"] == [1, 2]
    assert agreement(segmentation.from_png(outputs["class_map"]["data"][0]), reference[1]) >= AGREEMENT
    assert abs(sum(json.loads(outputs["shares"]["data"][0]).values()) - 1.0) < 1e-4


# ---- tsforge new --task image-segmentation ----

def test_new_declares_a_torchvision_segmenter_that_exports(tmp_path: Path) -> None:
    new = [sys.executable, "-m", "tsforge", "new", "seg", "--task", "image-segmentation", "--root", str(tmp_path)]
    result = subprocess.run([*new, "--from", "torchvision:lraspp_mobilenet_v3_large"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((tmp_path / "config" / "models" / "seg.yaml").read_text())
    assert config["handler"]["output"] == "png" and config["v2"]["outputs"][0]["name"] == "class_map"
    assert "image_segmentation(" in (tmp_path / "models" / "seg.py").read_text()
    env = {**os.environ, "TSFORGE_MODELS": str(tmp_path / "models")}
    exported = subprocess.run([sys.executable, "-m", "tsforge", "export", "seg", "--out-dir", str(tmp_path / "build")],
                              cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert exported.returncode == 0, exported.stderr[-2000:]
    report = json.loads((tmp_path / "build" / "seg" / "export.json").read_text())
    assert report["parity_max_abs_diff"] <= 1e-5 and report["input_shapes"] == [[1, 3, 224, 224]]
    labels = json.loads((tmp_path / "build" / "seg" / "index_to_name.json").read_text())
    assert labels["15"] == "person"  # VOC's names for a torchvision segmenter with 21 classes
    # a classifier is not a segmenter: one line naming what was expected, exit 2
    wrong = subprocess.run([*new[:4], "cls", *new[5:], "--from", "torchvision:mobilenet_v3_small"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 2 and len(wrong.stderr.splitlines()) == 1, wrong.stderr
    assert "[N, classes, H, W]" in wrong.stderr
