"""A corpus of malformed requests and property-based fuzzing over HTTP against the four example models: every one
is a 4xx JSON error (a body beyond max_request_size: the frontend's 413), the workers keep their PIDs, and the
workers' memory stays flat on decompression bombs. Figures go to reports/reliability/bad_input_bombs.json (or
TSFORGE_RELIABILITY_DATA: tests.test_reliability.record)."""

from __future__ import annotations

import base64
import json
import struct
import threading
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from export.models.resnet import sample_photos
from tests.conftest import StartServer, built_archive
from tests.test_images import bomb_png, save
from tests.test_reliability import record
from tsforge.serving.server import TorchServe

pytestmark = pytest.mark.integration

MODELS = ("digits", "resnet18", "minilm", "digits_tensor")
IMAGE_MODELS = ("digits", "resnet18")
MAX_REQUEST_SIZE = 6_553_500  # TorchServe's default; neither profile changes it
BOMB_RSS_BOUND_MB = 100.0


@dataclass(frozen=True)
class Bad:
    name: str
    model: str
    body: bytes
    content_type: str = "application/octet-stream"
    path: str = "predictions"  # or "v2" for /v2/models/MODEL/infer

    @property
    def id(self) -> str:
        return f"{self.model}:{self.name}"


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def photo(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    return save(Image.fromarray(sample_photos()["flower.jpg"]).resize(size), fmt)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(photo("JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    data = bytearray(save(Image.new("P", (4, 4)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    return bytes(data)


def corrupt(data: bytes, every: int = 7) -> bytes:
    out = bytearray(data)
    for i in range(len(out) // 3, len(out), every):
        out[i] ^= 0x5A
    return bytes(out)


def zlib_bomb() -> bytes:
    """A real PNG: 8000 x 6000 black pixels, a few tens of kilobytes compressed."""
    return save(Image.new("L", (8_000, 6_000)), "PNG", optimize=True)


BOMBS = {"bomb_png_20000x20000": bomb_png(20_000, 20_000), "bomb_png_100000x500": bomb_png(100_000, 500),
         "bomb_zlib_8000x6000": zlib_bomb(), "bomb_jpeg_65500x65500": jpeg_declaring(65_500, 65_500),
         "bomb_gif_65535x65535": gif_declaring(65_535, 65_535)}


def image_corpus(model: str) -> list[Bad]:
    png, jpg = photo("PNG"), photo("JPEG")
    raw = {
        "empty": b"",
        "truncated_png": png[: len(png) // 2],
        "truncated_jpeg": jpg[: len(jpg) // 2],
        "corrupt_png": corrupt(png),
        "png_signature_only": png[:8],
        "wrong_magic": b"GIF89a" + png[6:],
        "pdf": b"%PDF-1.4 not an image at all",
        "random_bytes": bytes(range(256)) * 4,
        **BOMBS,
    }
    if model != "digits":  # the digits handler scales any image to 8x8 by design; the classifiers refuse this
        raw["extreme_aspect_1x30000"] = save(Image.new("L", (1, 30_000)), "PNG")
    cases = [Bad(name, model, body) for name, body in raw.items()]
    cases += [Bad(name, model, as_json(value), "application/json") for name, value in {
        "broken_base64": {"data": "not//base64!!"},
        "base64_of_garbage": {"data": base64.b64encode(b"\x00\x01garbage" * 9).decode()},
        "data_uri_broken": {"data": "data:image/png;base64,!!!!"},
        "empty_string": {"data": ""},
        "json_bool": {"data": True},
        "json_null": {"data": None},
        "json_object": {"data": {"nested": {"deeper": 1}}},
        "json_empty_list": [],
        "instances_of_garbage": {"instances": ["@@@", 12]},
    }.items()]
    cases += [
        Bad("invalid_json", model, b'{"data": [0.1, ', "application/json"),
        Bad("invalid_utf8_text", model, b"\xff\xfe\xfa not utf-8 \xc3\x28", "text/plain"),
        Bad("form_urlencoded", model, b"data=%00%01", "application/x-www-form-urlencoded"),
        # (not here: a PNG sent as application/json, and a v2 FP32 [1, 8, 8] tensor to digits, are accepted by design)
    ]
    return cases


def digits_arrays() -> list[Bad]:
    row = [0.5] * 8
    return [
        Bad("array_wrong_shape", "digits", as_json({"data": [[0.1, 0.2]]}), "application/json"),
        Bad("array_out_of_range", "digits", as_json({"data": [[2.0] * 8] * 8}), "application/json"),
        Bad("array_nan", "digits", json.dumps({"data": [[float("nan"), *row[1:]], *[row] * 7]}).encode(),
            "application/json"),
        Bad("array_inf", "digits", json.dumps({"data": [[float("inf"), *row[1:]], *[row] * 7]}).encode(),
            "application/json"),
        Bad("array_strings", "digits", as_json({"data": [["a"] * 8] * 8}), "application/json"),
        Bad("array_ragged", "digits", as_json({"data": [row, row[:3]] + [row] * 6}), "application/json"),
    ]


def text_corpus() -> list[Bad]:
    return [
        Bad("empty", "minilm", b"", "text/plain"),
        Bad("blank_text", "minilm", as_json({"text": "   "}), "application/json"),
        Bad("text_is_number", "minilm", as_json({"text": 42}), "application/json"),
        Bad("text_is_list_of_dicts", "minilm", as_json({"text": [{"a": 1}]}), "application/json"),
        Bad("invalid_utf8", "minilm", b"caf\xe9 \xff\xfe", "text/plain"),
        Bad("too_long", "minilm", as_json({"text": "word " * 5_000}), "application/json"),
        Bad("binary_png", "minilm", photo("PNG")),
    ]


def v2(name: str, model: str, tensor: Any) -> Bad:
    return Bad(name, model, as_json({"inputs": tensor if name == "v2_inputs_not_list" else [tensor]}),
               "application/json", "v2")


def tensor_corpus() -> list[Bad]:
    fp32 = {"name": "x", "shape": [1, 8, 8], "datatype": "FP32"}
    return [
        Bad("json_wrong_shape", "digits_tensor", as_json([[0.0] * 8] * 7), "application/json"),
        Bad("json_nan", "digits_tensor", json.dumps([[[float("nan")] * 8] * 8]).encode(), "application/json"),
        Bad("json_too_many_elements", "digits_tensor", as_json([0.0] * 70_000), "application/json"),
        Bad("npy_truncated", "digits_tensor", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, "),
        Bad("npy_object_dtype_pickle", "digits_tensor", npy_object()),
        v2("v2_wrong_shape", "digits_tensor", {**fp32, "shape": [8, 8], "data": [0.0] * 64}),
        v2("v2_short_data", "digits_tensor", {**fp32, "data": [0.0] * 63}),
        v2("v2_unknown_datatype", "digits_tensor", {**fp32, "datatype": "FLOAT", "data": [0.0] * 64}),
        v2("v2_missing_datatype", "digits_tensor", {"name": "x", "shape": [1, 8, 8], "data": [0.0] * 64}),
        v2("v2_bytes_to_tensor_model", "digits_tensor", {"name": "x", "shape": [1], "datatype": "BYTES",
                                                         "data": ["abc"]}),
        v2("v2_fractional_int32", "digits_tensor", {**fp32, "datatype": "INT32", "data": [0.5] * 64}),
        v2("v2_data_not_list", "digits_tensor", {**fp32, "data": "zeros"}),
        v2("v2_negative_shape", "digits_tensor", {**fp32, "shape": [-1, 8, 8], "data": [0.0] * 64}),
        v2("v2_inputs_not_list", "digits_tensor", {"x": 1}),
        Bad("v2_no_inputs", "digits_tensor", as_json({"outputs": []}), "application/json", "v2"),
    ]


def npy_object() -> bytes:
    """An .npy header declaring an object (pickled) array: must be refused, never unpickled."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }".ljust(117) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\x80\x04N."


def corpus() -> list[Bad]:
    return [*image_corpus("digits"), *image_corpus("resnet18"), *digits_arrays(), *text_corpus(), *tensor_corpus()]


CORPUS = corpus()


@pytest.fixture(scope="module")
def server(start_server: StartServer) -> TorchServe:
    for model in MODELS:
        built_archive(model)
    return start_server(list(MODELS))


def url(server: TorchServe, bad: Bad) -> str:
    base = server.url("inference")
    return f"{base}/v2/models/{bad.model}/infer" if bad.path == "v2" else f"{base}/predictions/{bad.model}"


def worker_pids(server: TorchServe) -> dict[str, list[int]]:
    """Per model, the PIDs of its READY workers; a worker that is restarting is missing from its list."""
    pids = {}
    for model in MODELS:
        described = requests.get(f"{server.url('management')}/models/{model}", timeout=10).json()
        pids[model] = sorted(int(w["pid"]) for w in described[0]["workers"] if w["status"] == "READY")
    return pids


@pytest.fixture(scope="module", autouse=True)
def pids(server: TorchServe) -> dict[str, list[int]]:
    """The workers as the server came up, recorded before this module sends its first request (autouse: set up
    before the first test of the module runs), so a restart caused by any malformed request below is seen."""
    baseline = worker_pids(server)
    assert all(baseline.values()) and all(pid > 0 for found in baseline.values() for pid in found), baseline
    return baseline


def assert_json_4xx(response: requests.Response) -> dict[str, Any]:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()
    assert error["code"] == response.status_code and error["message"] and error["type"], error
    return dict(error)


def test_the_corpus_is_big_and_distinct() -> None:
    assert len({bad.id for bad in CORPUS}) == len(CORPUS) >= 40
    assert len({(bad.model, bad.body, bad.content_type, bad.path) for bad in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("bad", CORPUS, ids=[bad.id for bad in CORPUS])
def test_every_malformed_request_is_a_json_4xx(server: TorchServe, bad: Bad) -> None:
    response = requests.post(url(server, bad), data=bad.body, headers={"Content-Type": bad.content_type}, timeout=60)
    error = assert_json_4xx(response)
    if bad.name.startswith("bomb") or bad.name == "too_long":
        assert error["code"] == 413, error


@pytest.mark.parametrize("model", MODELS)
def test_a_body_beyond_max_request_size_is_413(server: TorchServe, model: str) -> None:
    response = requests.post(f"{server.url('inference')}/predictions/{model}", data=b"\0" * (MAX_REQUEST_SIZE + 1),
                             timeout=60)
    assert response.status_code == 413


class PeakRss:
    """The peak total RSS of some processes, sampled every 5 ms on a thread."""

    def __init__(self, pids: list[int]) -> None:
        self.processes = [psutil.Process(pid) for pid in pids]
        self.baseline = self.peak = self._total()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _total(self) -> float:
        return sum(p.memory_info().rss for p in self.processes) / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._total())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


def test_decompression_bombs_keep_worker_memory_flat(server: TorchServe, pids: dict[str, list[int]]) -> None:
    figures = {}
    for model in IMAGE_MODELS:
        monitor = PeakRss(pids[model])
        for name, body in BOMBS.items():
            for _ in range(5):
                response = requests.post(f"{server.url('inference')}/predictions/{model}", data=body, timeout=60)
                assert assert_json_4xx(response)["code"] == 413, name
        figures[model] = round(monitor.stop(), 1)
    assert max(figures.values()) < BOMB_RSS_BOUND_MB, figures
    record("bad_input_bombs", {"peak_worker_rss_growth_mb": figures, "bombs": sorted(BOMBS), "repeats": 5,
                               "bound_mb": BOMB_RSS_BOUND_MB, "corpus_size": len(CORPUS)})


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
CONTENT_TYPES = st.sampled_from(["application/octet-stream", "application/json", "text/plain", "image/png",
                                 "image/jpeg", "multipart/form-data", "application/x-npy", ""])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=32),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(
        st.sampled_from(["data", "b64", "instances", "inputs", "text", "shape", "datatype"]) | st.text(max_size=6),
        children, max_size=4),
    max_leaves=24)


def post_fuzz(server: TorchServe, model: str, body: bytes, content_type: str, v2: bool = False) -> None:
    target = Bad("fuzz", model, body, content_type, "v2" if v2 else "predictions")
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.post(url(server, target), data=body, headers=headers, timeout=60)
    if response.status_code != 200:
        assert_json_4xx(response)


@FUZZ
@given(model=st.sampled_from(MODELS), body=st.binary(max_size=2048), content_type=CONTENT_TYPES)
def test_fuzzed_bytes_get_an_answer_or_a_json_4xx(server: TorchServe, model: str, body: bytes,
                                                   content_type: str) -> None:
    post_fuzz(server, model, body, content_type)


@FUZZ
@given(model=st.sampled_from(MODELS), value=JSON_VALUES, v2=st.booleans())
def test_fuzzed_json_gets_an_answer_or_a_json_4xx(server: TorchServe, model: str, value: Any, v2: bool) -> None:
    post_fuzz(server, model, json.dumps(value).encode(), "application/json", v2)


def test_no_worker_restarted(server: TorchServe, pids: dict[str, list[int]]) -> None:
    """Every worker that served before the first malformed request still serves, with the same PID; and none of
    them died and came back (a replacement would have a new PID, and the frontend logs each death)."""
    assert worker_pids(server) == pids
    logs = {"model_log.log": "Backend worker process died", "ts_log.log": "Retry worker:"}
    died = [line for log, marker in logs.items()
            for line in (server.run_dir / "logs" / log).read_text(errors="replace").splitlines() if marker in line]
    assert died == []

