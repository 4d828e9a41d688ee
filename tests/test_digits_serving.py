"""Digits through a real TorchServe: every held-out image in three encodings, health, bad input."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import requests
import torch

from export.models.digits import to_tensor
from tests.conftest import BUILD, png_bytes
from tsforge.serving.server import TorchServe

pytestmark = pytest.mark.integration


def post_all(url: str, requests_kwargs: list[dict[str, Any]], workers: int = 8) -> list[requests.Response]:
    def send(kwargs: dict[str, Any]) -> requests.Response:
        return requests.post(url, timeout=60, **kwargs)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(send, requests_kwargs))


def worker_pids(server: TorchServe, model: str) -> list[int]:
    described = requests.get(f"{server.url('management')}/models/{model}", timeout=10).json()
    return sorted(w["pid"] for w in described[0]["workers"])


def test_ping_is_healthy(digits_server: TorchServe) -> None:
    response = requests.get(digits_server.url("inference") + "/ping", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "Healthy"


@pytest.mark.parametrize("encoding", ["png", "base64", "json"])
def test_every_held_out_image_gets_the_offline_label(digits_server: TorchServe, digits_split, encoding: str) -> None:
    _, _, x_test, y_test = digits_split
    model = torch.jit.load(str(BUILD / "digits" / "digits.pt"))
    with torch.inference_mode():
        offline = model(to_tensor(x_test)).argmax(1).numpy()
    if encoding == "png":
        bodies = [{"data": png_bytes(x)} for x in x_test]
    elif encoding == "base64":
        bodies = [{"data": base64.b64encode(png_bytes(x))} for x in x_test]
    else:
        bodies = [{"json": (x / 255.0).tolist()} for x in x_test]
    responses = post_all(digits_server.url("inference") + "/predictions/digits", bodies)
    assert [r.status_code for r in responses] == [200] * len(x_test)
    served = np.array([int(r.json()["label"]) for r in responses])
    assert (served == offline).mean() == 1.0
    assert (served == y_test).mean() >= 0.95
    first = responses[0].json()
    assert len(first["probabilities"]) == 3 and first["label"] in first["probabilities"]


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"data": b"\x00garbage\xff" * 10}, 400, "undecodable_input"),
    ({"json": {"pixels": [1, 2]}}, 400, "undecodable_input"),
    ({"json": [[0.5] * 7] * 8}, 422, "invalid_input"),
    ({"json": [16.0] * 64}, 422, "invalid_input"),
    ({"data": "not//base64!!"}, 400, "undecodable_input"),
])
def test_garbage_gets_a_json_4xx_and_the_worker_keeps_serving(
    digits_server: TorchServe, digits_split, body: dict[str, Any], status: int, kind: str
) -> None:
    url = digits_server.url("inference") + "/predictions/digits"
    before = worker_pids(digits_server, "digits")
    response = requests.post(url, timeout=30, **body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["code"] == status and error["type"] == kind and error["message"]
    good = requests.post(url, data=png_bytes(digits_split[2][0]), timeout=30)
    assert good.status_code == 200 and json.loads(good.text)["label"] == str(digits_split[3][0])
    assert worker_pids(digits_server, "digits") == before
