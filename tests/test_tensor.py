"""The generic tensor handler through a real TorchServe, with the digits CNN as `digits_tensor`."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import requests
import torch

from export.models.digits import to_tensor
from tests.conftest import BUILD, StartServer, built_archive
from tsforge.serving.server import TorchServe

pytestmark = pytest.mark.integration
MODEL = "digits_tensor"


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(start_server: StartServer) -> TorchServe:
    built_archive(MODEL)
    return start_server([MODEL])


@pytest.fixture(scope="module")
def url(server: TorchServe) -> str:
    return f"{server.url('inference')}/predictions/{MODEL}"


@pytest.fixture(scope="module")
def held_out(digits_split) -> tuple[np.ndarray, np.ndarray]:
    """Held-out inputs as float32 [N, 1, 8, 8] and the offline logits of the exported TorchScript file."""
    inputs = to_tensor(digits_split[2][:48])
    model = torch.jit.load(str(BUILD / MODEL / f"{MODEL}.pt"))
    with torch.inference_mode():
        return inputs.numpy(), model(inputs).numpy()


def post_all(url: str, bodies: list[dict[str, Any]]) -> list[requests.Response]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda kwargs: requests.post(url, timeout=60, **kwargs), bodies))


@pytest.mark.parametrize("encoding", ["json", "npy", "npy_base64_json", "npy_base64_body"])
def test_every_encoding_gives_the_offline_logits(url: str, held_out, encoding: str) -> None:
    inputs, logits = held_out
    make = {
        "json": lambda x: {"json": x.tolist()},
        "npy": lambda x: {"data": npy(x), "headers": {"Content-Type": "application/octet-stream"}},
        "npy_base64_json": lambda x: {"json": {"data": base64.b64encode(npy(x)).decode()}},
        "npy_base64_body": lambda x: {"data": base64.b64encode(npy(x))},
    }[encoding]
    responses = post_all(url, [make(x) for x in inputs])
    assert [r.status_code for r in responses] == [200] * len(inputs), responses[0].text
    first = responses[0].json()
    assert first["shape"] == [10] and first["dtype"] == "float32"
    served = np.array([r.json()["output"] for r in responses], dtype=np.float32)
    np.testing.assert_allclose(served, logits, rtol=1e-5, atol=1e-5)


def test_instances_and_safe_casts_are_accepted(url: str, held_out) -> None:
    inputs, logits = held_out
    many = requests.post(url, json={"instances": inputs[:3].tolist()}, timeout=30)
    assert many.status_code == 200
    np.testing.assert_allclose([p["output"] for p in many.json()["predictions"]], logits[:3], atol=1e-5)
    half = inputs[0].astype(np.float16)  # float16 casts to float32 without loss: allowed under "safe"
    response = requests.post(url, data=npy(half), timeout=30)
    assert response.status_code == 200
    model = torch.jit.load(str(BUILD / MODEL / f"{MODEL}.pt"))
    with torch.inference_mode():
        expected = model(torch.from_numpy(half.astype(np.float32))[None])[0].numpy()
    np.testing.assert_allclose(response.json()["output"], expected, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "received"), [
    ({"json": np.zeros((8, 8)).tolist()}, "[8, 8]"),
    ({"json": np.zeros((1, 8, 7)).tolist()}, "[1, 8, 7]"),
    ({"data": npy(np.zeros((2, 1, 8, 8), np.float32))}, "[2, 1, 8, 8]"),
    ({"json": {"data": base64.b64encode(npy(np.zeros(64, np.float32))).decode()}}, "[64]"),
])
def test_a_wrong_shape_is_a_422_naming_both_shapes(url: str, kwargs: dict[str, Any], received: str) -> None:
    response = requests.post(url, timeout=30, **kwargs)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["type"] == "invalid_input"
    assert received in error["message"] and "[1, 8, 8]" in error["message"], error["message"]


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.uint64])
def test_a_dtype_that_does_not_cast_safely_is_a_422_naming_both(url: str, dtype: type) -> None:
    response = requests.post(url, data=npy(np.zeros((1, 8, 8), dtype)), timeout=30)
    assert response.status_code == 422, response.text
    message = response.json()["message"]
    assert "float32" in message and np.dtype(dtype).name in message


def test_garbage_is_a_4xx_and_the_worker_keeps_serving(server: TorchServe, url: str, held_out) -> None:
    described = requests.get(f"{server.url('management')}/models/{MODEL}", timeout=10).json()
    before = [w["pid"] for w in described[0]["workers"]]
    bad: list[tuple[dict[str, Any], int]] = [
        ({"data": b"\x93NUMPY\x01\x00garbage"}, 400),          # a truncated .npy header
        ({"json": [[["a"] * 8] * 8]}, 422),                     # strings, not numbers
        ({"json": [[[float("1e39")] * 8] * 8]}, 422),           # overflows float32
        ({"json": {"tensor": [1, 2]}}, 400),                    # no known payload field
        ({"data": npy(np.zeros((1, 300, 300), np.float32))}, 413),  # more elements than max_elements
    ]
    for kwargs, status in bad:
        response = requests.post(url, timeout=30, **kwargs)
        assert response.status_code == status, response.text
        assert response.json()["code"] == status and response.json()["message"]
    good = requests.post(url, json=held_out[0][0].tolist(), timeout=30)
    assert good.status_code == 200
    described = requests.get(f"{server.url('management')}/models/{MODEL}", timeout=10).json()
    assert [w["pid"] for w in described[0]["workers"]] == before
