"""Open Inference Protocol (KServe v2) REST through a real TorchServe 0.12: the tensor and an image model.

What TorchServe 0.12 does itself: POST /v2/models/<m>/infer goes to the model like /predictions/<m>
(body in, handler's bytes out), so the v2 answer is built by the handler (handlers/oip.py). The health
endpoints /v2/health/ready and /v2/health/live exist only with `ts_open_inference_protocol=true`;
GET /v2/models/<m>/ready does not exist over REST at all (404).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import requests

from export.models.digits import to_tensor
from tests.conftest import StartServer, built_archive, png_bytes
from tsforge.clients import grpc_stubs
from tsforge.project import archive_version
from tsforge.serving.server import TorchServe

pytestmark = pytest.mark.integration
TENSOR, IMAGE = "digits_tensor", "digits"
GENERIC_IMAGE = "digits_image"  # the same weights behind handlers/image_handler.py


@pytest.fixture(scope="module")
def server(start_server: StartServer) -> TorchServe:
    for name in (TENSOR, IMAGE, GENERIC_IMAGE):
        built_archive(name)
    return start_server([TENSOR, IMAGE, GENERIC_IMAGE], overrides={"ts_open_inference_protocol": "true"})


@pytest.fixture(scope="module")
def base(server: TorchServe) -> str:
    return server.url("inference")


@pytest.fixture(scope="module")
def inputs(digits_split) -> np.ndarray:
    return to_tensor(digits_split[2][:6]).numpy()


def fp32(name: str, array: np.ndarray) -> dict[str, Any]:
    return {"name": name, "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}


def test_v2_infer_returns_the_numbers_of_predictions(base: str, inputs: np.ndarray) -> None:
    response = requests.post(f"{base}/v2/models/{TENSOR}/infer", timeout=30,
                             json={"id": "req-42", "inputs": [fp32("input-0", inputs)]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == TENSOR and body["model_version"] == archive_version(1) and body["id"] == "req-42"
    [logits] = body["outputs"]
    assert logits["name"] == "logits" and logits["datatype"] == "FP32" and logits["shape"] == [len(inputs), 10]
    with ThreadPoolExecutor(6) as pool:
        classic = list(pool.map(lambda x: requests.post(f"{base}/predictions/{TENSOR}", json=x.tolist(), timeout=30),
                                inputs))
    expected = np.array([r.json()["output"] for r in classic])
    # one batch of six against six single requests: float rounding of differently sized batches only
    np.testing.assert_allclose(np.array(logits["data"]).reshape(len(inputs), 10), expected, rtol=1e-5, atol=2e-5)


def test_one_item_without_batch_dimension_and_a_generated_id(base: str, inputs: np.ndarray) -> None:
    response = requests.post(f"{base}/v2/models/{TENSOR}/infer", json={"inputs": [fp32("x", inputs[0])]}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] and body["outputs"][0]["shape"] == [1, 10]
    nested = {"name": "x", "shape": [1, 8, 8], "datatype": "FP64", "data": inputs[0].astype(np.float64).tolist()}
    fp64 = requests.post(f"{base}/v2/models/{TENSOR}/infer", json={"inputs": [nested]}, timeout=30)
    assert fp64.status_code == 422 and "float64" in fp64.json()["message"]  # FP64 does not cast safely to float32


@pytest.mark.parametrize("model", [IMAGE, GENERIC_IMAGE])
def test_v2_bytes_input_for_an_image_model(base: str, digits_split, model: str) -> None:
    images, labels = digits_split[2][:3], digits_split[3][:3]
    encoded = [base64.b64encode(png_bytes(x)).decode() for x in images]
    request = {"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": encoded}]}
    response = requests.post(f"{base}/v2/models/{model}/infer", json=request, timeout=30)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["output"]["shape"] == [3, 10] and outputs["label"]["datatype"] == "BYTES"
    classic = [requests.post(f"{base}/predictions/{model}", data=png_bytes(x), timeout=30).json()["label"]
               for x in images]
    assert outputs["label"]["data"] == classic == [str(y) for y in labels]
    only = requests.post(f"{base}/v2/models/{model}/infer", json={**request, "outputs": [{"name": "label"}]},
                         timeout=30)
    assert [o["name"] for o in only.json()["outputs"]] == ["label"]


def test_v2_and_classic_requests_batched_together_keep_their_forms(base: str, inputs: np.ndarray) -> None:
    def send(n: int) -> requests.Response:
        x = inputs[n % len(inputs)]
        if n % 2:
            return requests.post(f"{base}/v2/models/{TENSOR}/infer", json={"inputs": [fp32("x", x[None])]}, timeout=30)
        return requests.post(f"{base}/predictions/{TENSOR}", json=x.tolist(), timeout=30)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(24)))
    assert [r.status_code for r in answers] == [200] * 24
    for n, r in enumerate(answers):
        assert ("outputs" in r.json()) == bool(n % 2)


def test_v2_health_and_readiness(base: str, server: TorchServe) -> None:
    assert requests.get(f"{base}/v2/health/ready", timeout=10).json() == {"ready": True}
    assert requests.get(f"{base}/v2/health/live", timeout=10).json() == {"live": True}
    # TorchServe 0.12 has no REST model-readiness route; the management API says whether workers are READY.
    assert requests.get(f"{base}/v2/models/{TENSOR}/ready", timeout=10).status_code == 404
    described = requests.get(f"{server.url('management')}/models/{TENSOR}", timeout=10).json()
    assert any(w["status"] == "READY" for w in described[0]["workers"])


@pytest.mark.parametrize(("model", "tensor", "status", "needle"), [
    (TENSOR, {"name": "x", "shape": [1, 8, 8], "data": [0.0] * 64}, 422, "datatype"),
    (TENSOR, {"name": "x", "shape": [1, 8, 8], "datatype": "FP32", "data": [0.0] * 63}, 422, "63"),
    (TENSOR, {"name": "x", "shape": [1, 8, 8], "datatype": "FLOAT", "data": [0.0] * 64}, 422, "FLOAT"),
    (TENSOR, {"name": "x", "shape": [8, 8], "datatype": "FP32", "data": [0.0] * 64}, 422, "[1, 8, 8]"),
    (TENSOR, {"name": "x", "shape": [1], "datatype": "BYTES", "data": ["abc"]}, 422, "BYTES"),
    (TENSOR, {"name": "x", "shape": [1, 8, 8], "datatype": "INT32", "data": [0.5] * 64}, 422, "fractional"),
    (IMAGE, {"name": "x", "shape": [1], "datatype": "BYTES", "data": ["not//base64!!"]}, 400, "base64"),
])
def test_a_bad_v2_request_is_a_json_4xx(base: str, model: str, tensor: dict[str, Any], status: int,
                                        needle: str) -> None:
    response = requests.post(f"{base}/v2/models/{model}/infer", json={"inputs": [tensor]}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["code"] == status and needle in error["message"], error
    # also a v2 answer: the protocol's "error" field, and the fields TorchServe's gRPC bridge reads
    assert error["error"] == error["message"] and error["model_name"] == model
    assert error["outputs"][0]["name"] == "error"


def test_two_inputs_or_an_unknown_output_are_refused(base: str, inputs: np.ndarray) -> None:
    url = f"{base}/v2/models/{TENSOR}/infer"
    two = requests.post(url, json={"inputs": [fp32("a", inputs[:1]), fp32("b", inputs[:1])]}, timeout=30)
    assert two.status_code == 422 and "one input" in two.json()["message"]
    unknown = requests.post(url, json={"inputs": [fp32("a", inputs[:1])], "outputs": [{"name": "probs"}]}, timeout=30)
    assert unknown.status_code == 422 and "logits" in unknown.json()["message"]
    assert requests.post(f"{base}/v2/models/nope/infer", json={"inputs": []}, timeout=30).status_code == 404


# ---- the same protocol over gRPC (TorchServe's OIP gRPC service, on with ts_open_inference_protocol) -----------

@pytest.fixture(scope="module")
def grpc_oip(server: TorchServe) -> Iterator[tuple[Any, Any]]:
    stubs = grpc_stubs.stubs()
    with grpc.insecure_channel(f"127.0.0.1:{server.props['grpc_inference_port']}") as channel:
        yield stubs.open_inference, stubs.open_inference_grpc.GRPCInferenceServiceStub(channel)


def worker_pids(server: TorchServe, model: str) -> list[int]:
    described = requests.get(f"{server.url('management')}/models/{model}", timeout=10).json()
    return sorted(w["pid"] for w in described[0]["workers"])


def test_grpc_model_ready_and_infer_match_rest(grpc_oip, base: str, inputs: np.ndarray) -> None:
    pb, stub = grpc_oip
    assert stub.ModelReady(pb.ModelReadyRequest(name=TENSOR)).ready
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(inputs.shape),
                                                   contents=pb.InferTensorContents(fp32_contents=inputs.ravel()))
    answer = stub.ModelInfer(pb.ModelInferRequest(model_name=TENSOR, id="g-1", inputs=[tensor]))
    assert answer.id == "g-1" and answer.model_version == archive_version(1)
    [logits] = answer.outputs
    assert logits.name == "logits" and list(logits.shape) == [len(inputs), 10]
    rest = requests.post(f"{base}/v2/models/{TENSOR}/infer", json={"inputs": [fp32("x", inputs)]}, timeout=30)
    np.testing.assert_allclose(np.array(logits.contents.fp32_contents), rest.json()["outputs"][0]["data"], atol=2e-5)


def test_grpc_bytes_are_raw_image_bytes(grpc_oip, digits_split) -> None:
    pb, stub = grpc_oip
    images, labels = digits_split[2][:2], digits_split[3][:2]
    contents = pb.InferTensorContents(bytes_contents=[png_bytes(x) for x in images])
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[2], contents=contents)
    answer = stub.ModelInfer(pb.ModelInferRequest(model_name=IMAGE, inputs=[tensor]))
    label = next(o for o in answer.outputs if o.name == "label")
    # TorchServe 0.12 writes each BYTES output element as JSON text (a quoted string).
    assert [json.loads(b) for b in label.contents.bytes_contents] == [str(y) for y in labels]


def test_a_bad_grpc_request_is_answered_without_killing_the_worker(grpc_oip, server: TorchServe) -> None:
    pb, stub = grpc_oip
    before = worker_pids(server, TENSOR)
    short = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 8, 8],
                                                  contents=pb.InferTensorContents(fp32_contents=[0.5] * 63))
    answer = stub.ModelInfer(pb.ModelInferRequest(model_name=TENSOR, id="bad", inputs=[short]))
    [error] = answer.outputs
    assert error.name == "error" and "63" in json.loads(json.loads(error.contents.bytes_contents[0]))["message"]
    assert worker_pids(server, TENSOR) == before
