"""The object detector (handlers/detection_handler.py, model_store/detector.mar): boxes in the original image's
pixels equal to the eager torchvision model's on the same image, the config's threshold and maximum, a 4xx per bad
request within a batch; then through a real TorchServe: JSON, raw JPEG, v1, multipart and v2 requests batched with
bad ones."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from export.models.detection import eager_from_torchscript
from export.models.resnet import jpeg, real_views, sample_photos
from handlers import autoselect
from handlers.accuracy import AccuracyRefused
from handlers.runtimes import Variant
from loadtest.inprocess import LocalHandler
from loadtest.payloads import Case, check_detections
from tests.conftest import BUILD, ROOT, built_archive
from tests.test_images import bomb_png, save
from tests.test_new import tsforge
from tsforge.packaging import archive
from tsforge.serving.server import TorchServe

#: whole models exported, trained or served from their own archives: `make test` runs these, test-fast does not
pytestmark = pytest.mark.slow

MODEL = "detector"
#: box corners in pixels, scores: the handler resizes [0, 1] floats before the model normalises them, eager after;
#: the rounding of the two orders differs by ~1e-7, and the handler rounds boxes to 0.01 px
BOX_TOLERANCE = 0.1
SCORE_TOLERANCE = 1e-3


def same_detections(answer: dict[str, Any], reference: dict[str, Any]) -> bool:
    """The same boxes, labels and scores within the bench's tolerances (loadtest.payloads.check_detections): a
    request batched with others runs other kernels than alone on some CPUs (AVX2), which moves the last digits."""
    return check_detections(reference["detections"], answer) is None


@pytest.fixture(scope="module")
def mar() -> Path:
    return built_archive(MODEL)


@pytest.fixture(scope="module")
def local(mar: Path) -> LocalHandler:
    return LocalHandler.load(mar)


@pytest.fixture(scope="module")
def eager() -> torch.nn.Module:
    return eager_from_torchscript(str(BUILD / MODEL / f"{MODEL}.pt"))


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {name.split(".")[0]: jpeg(photo) for name, photo in sample_photos().items()}


def answers(local: LocalHandler, bodies: Sequence[bytes]) -> list[tuple[int, Any]]:
    return [(status, json.loads(body)) for status, body in
            local.handle([Case(str(n), body, "image/jpeg") for n, body in enumerate(bodies)])]


def eager_answer(model: torch.nn.Module, data: bytes, labels: list[str], threshold: float) -> list[dict[str, Any]]:
    """The eager model on the image as sent (it resizes and scales its boxes back itself), above the threshold."""
    pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
    with torch.inference_mode():
        found = model([pixels.float() / 255.0])[0]
    keep = found["scores"] >= threshold
    return [{"label": labels[int(label)], "score": float(score), "box": box.tolist()}
            for box, score, label in zip(found["boxes"][keep], found["scores"][keep], found["labels"][keep],
                                         strict=True)]


def assert_same_detections(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert len(got) == len(expected), (len(got), len(expected))
    for g, e in zip(got, expected, strict=True):
        assert g["label"] == e["label"]
        assert abs(g["score"] - e["score"]) <= SCORE_TOLERANCE, (g, e)
        assert np.allclose(g["box"], e["box"], atol=BOX_TOLERANCE), (g, e)


def test_boxes_are_the_eager_models_in_the_original_pixels(local: LocalHandler, eager: torch.nn.Module,
                                                            photos: dict[str, bytes]) -> None:
    """The china photo at its own size, scaled up 2x (the handler resizes to 320 then scales boxes back by 2) and a
    crop with the other aspect ratio: each answer is what the eager model gives on that image."""
    labels = local.handler.labels
    threshold = local.handler.score_threshold
    china = Image.open(io.BytesIO(photos["china"]))
    bodies = [photos["china"], jpeg(np.asarray(china.resize((china.width * 2, china.height * 2)))),
              jpeg(np.asarray(china.crop((100, 0, 400, 427)))), *real_views(3, seed=11)]
    served = answers(local, bodies)
    compared = 0
    for (status, answer), body in zip(served, bodies, strict=True):
        assert status == 200, answer
        expected = eager_answer(eager, body, labels, threshold)
        assert_same_detections(answer["detections"], expected)
        compared += len(expected)
    assert compared >= 10, "the example photos should give detections to compare at the config's threshold"
    width, height = china.size
    big = served[1][1]["detections"]
    assert big and all(0 <= d["box"][0] <= d["box"][2] <= 2 * width and 0 <= d["box"][1] <= d["box"][3] <= 2 * height
                       for d in big)
    assert max(d["box"][3] for d in big) > height, "boxes of the 2x image are in its own pixels"


def test_threshold_and_maximum_come_from_the_config(mar: Path, local: LocalHandler, photos: dict[str, bytes]) -> None:
    everything = answers(local, [photos["china"]])[0][1]["detections"]
    strict = LocalHandler.load(mar, {"score_threshold": 0.95, "max_detections": 3})
    answer = answers(strict, [photos["china"]])[0][1]["detections"]
    scores = [d["score"] for d in answer]
    assert 0 < len(answer) <= 3 and scores == sorted(scores, reverse=True)
    assert all(s >= 0.95 for s in scores)
    assert answer == [d for d in everything if d["score"] >= 0.95][:3]
    assert len(everything) > 3 and [d["score"] for d in everything] == sorted((d["score"] for d in everything),
                                                                              reverse=True)


def test_the_served_variant_keeps_the_detection_bound_and_moved_boxes_are_refused(local: LocalHandler) -> None:
    """Each worker times the program as exported and frozen for inference, and serves the faster only within the
    declared detection F1 on the held-out views; a runner whose boxes moved by 40 px is refused with its figure."""
    handler = local.handler
    selection = handler.selection
    assert selection["candidates"] == ["torchscript-fp32", "torchscript-fp32+fusion"]
    assert {t["variant"] for t in selection["trials"]} == set(selection["candidates"])
    if selection["variant"] != "torchscript-fp32":
        assert selection["accuracy"]["measure"] == "detection_f1" and selection["accuracy"]["within_bound"]
    served = handler.model
    check = handler.accuracy_check(served)
    assert check is not None
    assert check(served).value == 1.0

    def moved(images: list[torch.Tensor]) -> tuple[Any, list[dict[str, torch.Tensor]]]:
        losses, found = served(images)
        return losses, [{**d, "boxes": d["boxes"] + 40.0} for d in found]

    verdict = check(moved)
    assert not verdict.within and verdict.value < 0.5, verdict
    with pytest.raises(AccuracyRefused, match=r"refusing to serve torchscript-fp32\+fusion: detection_f1 0\.\d+ < "):
        autoselect.only(autoselect.Trial(Variant("torchscript", "fp32", True), runner=moved), handler.settings, check)


def test_bad_rows_get_their_own_4xx_and_the_batch_goes_on(local: LocalHandler, photos: dict[str, bytes]) -> None:
    alone = [answers(local, [photos[name]])[0] for name in ("china", "flower")]
    bodies = [photos["china"], b"not an image", photos["china"][: len(photos["china"]) // 2], b"",
              bomb_png(20_000, 20_000), save(Image.new("RGB", (1, 40_000)), "PNG"), photos["flower"]]
    served = answers(local, bodies)
    assert [s for s, _ in served] == [200, 400, 400, 400, 413, 422, 200]
    for status, answer in served[1:-1]:
        assert {"code", "type", "message"} <= set(answer) and answer["code"] == status
    assert "truncated" in served[2][1]["message"] and "empty" in served[3][1]["message"]
    for (status, answer), (alone_status, alone_answer) in zip([served[0], served[-1]], alone, strict=True):
        assert status == alone_status == 200 and same_detections(answer, alone_answer)


def test_tsforge_new_declares_a_detector_that_answers_as_the_shipped_one(tmp_path: Path, mar: Path,
                                                                         local: LocalHandler,
                                                                         photos: dict[str, bytes]) -> None:
    """`tsforge new --task object-detection --from torchvision:...` with the shipped detector's weights as a state
    dict, then export and archive outside the checkout: the archive's handler answers as detector.mar's."""
    weights = tmp_path / "detector.pth"
    torch.save(torch.jit.load(str(BUILD / MODEL / f"{MODEL}.pt")).state_dict(), weights)  # type: ignore[no-untyped-call]
    env = {**os.environ, "TSFORGE_MODELS": str(tmp_path / "models")}
    tsforge("new", "det", "--task", "object-detection", "--from", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
            "--weights", str(weights), "--root", str(tmp_path), env=env)
    tsforge("export", "det", "--out-dir", str(tmp_path / "build"), env=env)
    tsforge("archive", "det", "--config", str(tmp_path / "config" / "models" / "det.yaml"), "--build-dir",
            str(tmp_path / "build"), "--store", str(tmp_path / "store"), env=env)
    declared = LocalHandler.load(tmp_path / "store" / "det.mar")
    bodies = [photos["china"], *real_views(2, seed=11)]
    ours, shipped = answers(declared, bodies), answers(local, bodies)
    assert [s for s, _ in ours] == [s for s, _ in shipped] == [200] * len(bodies)
    # each archive's worker measures which program serves faster (as exported or frozen); both answer alike
    assert all(same_detections(a, b) for (_, a), (_, b) in zip(ours, shipped, strict=True))
    assert shipped[0][1]["detections"]


@pytest.mark.parametrize(("args", "message"), [
    (["--from", "torchvision:resnet18"], "object-detection expects a torchvision-style detector"),
    (["--from", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "--variants", "int8"], "scripted fp32"),
])
def test_tsforge_new_refuses_what_is_not_a_detector_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = tsforge("new", "det", "--task", "object-detection", *args, "--root", str(tmp_path), env=dict(os.environ),
                     check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists()


# ---- through TorchServe ----

BATCH = 6
BATCH_DELAY_MS = 4000  # long enough that a burst of BATCH requests lands in one batch


@pytest.fixture(scope="module")
def server(start_server: Any, mar: Path, tmp_path_factory: pytest.TempPathFactory) -> TorchServe:
    """detector with a batch of exactly BATCH and a long delay, so good and bad requests share a batch."""
    store = tmp_path_factory.mktemp("detector_store")
    config = yaml.safe_load((ROOT / "config" / "models" / f"{MODEL}.yaml").read_text())
    config.update(batchSize=BATCH, maxBatchDelay=BATCH_DELAY_MS)
    config_file = store / "detector-batching.yaml"
    config_file.write_text(yaml.safe_dump(config))
    archive.main([MODEL, "--config", str(config_file), "--store", str(store), "--build-dir", str(BUILD)])
    started: TorchServe = start_server([MODEL], store=store)
    return started


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.integration
def test_served_answers_match_in_process_and_bad_requests_fail_alone(server: TorchServe, local: LocalHandler,
                                                                     photos: dict[str, bytes]) -> None:
    china, flower = photos["china"], photos["flower"]
    view = real_views(1, seed=11)[0]
    url = server.url("inference") + f"/predictions/{MODEL}"
    calls: list[dict[str, Any]] = [
        {"data": china},
        {"json": {"data": b64(view)}},
        {"data": b"GIF89a broken"},
        {"files": {"image": ("view.jpg", view)}},
        {"json": {"instances": [{"b64": b64(china)}, b64(flower)]}},
        {"data": bomb_png(20_000, 20_000)},
    ]
    assert len(calls) == BATCH
    with ThreadPoolExecutor(BATCH) as pool:
        responses = list(pool.map(lambda kw: requests.post(url, timeout=120, **kw), calls))
    assert [r.status_code for r in responses] == [200, 200, 400, 200, 200, 413], [r.text[:200] for r in responses]
    expected = {name: answers(local, [body])[0][1] for name, body in (("china", china), ("flower", flower),
                                                                       ("view", view))}
    assert expected["china"]["detections"], "the reference should have detections to compare"
    assert same_detections(responses[0].json(), expected["china"])
    assert same_detections(responses[1].json(), expected["view"])
    assert same_detections(responses[3].json(), expected["view"])
    predictions = responses[4].json()["predictions"]
    assert len(predictions) == 2
    assert same_detections(predictions[0], expected["china"]) and same_detections(predictions[1], expected["flower"])
    assert responses[2].json()["type"] == "undecodable_input"
    assert responses[5].json()["type"] == "payload_too_large"


@pytest.mark.integration
def test_v2_infer_returns_boxes_scores_labels_and_image_index(server: TorchServe, local: LocalHandler,
                                                              photos: dict[str, bytes]) -> None:
    body = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                        "data": [b64(photos["china"]), b64(real_views(1, seed=11)[0])]}]}
    answer = requests.post(f"{server.url('inference')}/v2/models/{MODEL}/infer", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert set(outputs) == {"boxes", "scores", "labels", "image"}
    declared = yaml.safe_load((ROOT / "config" / "models" / f"{MODEL}.yaml").read_text())["v2"]["outputs"]
    assert {o["name"]: o["datatype"] for o in declared} == {n: o["datatype"] for n, o in outputs.items()}
    expected = [answers(local, [photos["china"]])[0][1]["detections"],
                answers(local, [real_views(1, seed=11)[0]])[0][1]["detections"]]
    image = outputs["image"]["data"]
    assert image == [0] * len(expected[0]) + [1] * len(expected[1])
    boxes = np.asarray(outputs["boxes"]["data"]).reshape(outputs["boxes"]["shape"])
    assert outputs["boxes"]["shape"] == [len(image), 4]
    flat = expected[0] + expected[1]
    assert np.allclose(boxes, [d["box"] for d in flat], atol=0.01)
    assert outputs["labels"]["data"] == [d["label"] for d in flat]
    assert np.allclose(outputs["scores"]["data"], [d["score"] for d in flat], atol=SCORE_TOLERANCE)
    bad = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(b"nope")]}]}
    refused = requests.post(f"{server.url('inference')}/v2/models/{MODEL}/infer", json=bad, timeout=120)
    assert refused.status_code == 400 and "not an image" in refused.text
