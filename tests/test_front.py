"""The standard v2 front (tsforge/serving/front.py) against a real TorchServe, with clients nobody here wrote:
tritonclient over REST and gRPC in this process, and the `kserve` package's own REST and gRPC clients in a
subprocess (kserve and tritonclient.grpc register the same `inference.*` protos, so one process cannot hold both).
Every example model: health, ready, metadata as its config declares it, and infer agreeing with TorchServe's own
v2 endpoint. The prod profile: no token or a wrong one refused on REST and gRPC."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import yaml
from tritonclient.utils import InferenceServerException

from tests.conftest import ROOT, StartServer, built_archive
from tests.test_security import listening_addresses
from tests.v2_inputs import as_json_strings, inputs_for
from tsforge.serving import frontproc
from tsforge.serving.front_rest import MAX_REQUEST_SIZE, error_message
from tsforge.serving.server import KEY_FILE, TorchServe

pytestmark = pytest.mark.integration  # every test here serves through a real TorchServe

MODELS = ["digits", "digits_image", "digits_tensor", "resnet18", "minilm"]
PROD_CONFIG = ROOT / "config" / "prod.properties"


def direct(server: TorchServe, model: str) -> dict[str, np.ndarray[Any, Any]]:
    """TorchServe's own v2 answer to the same inputs (BYTES as JSON strings, as its REST v2 endpoint takes them)."""
    name, datatype, array = inputs_for(model)
    data = list(as_json_strings(model, array)) if datatype == "BYTES" else array.ravel().tolist()
    body = {"inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}]}
    answer = requests.post(f"{server.url('inference')}/v2/models/{model}/infer", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer.json()["outputs"]}


def agrees(model: str, got: dict[str, np.ndarray[Any, Any]], expected: dict[str, np.ndarray[Any, Any]]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        if value.dtype.kind in "USO":  # labels
            assert [str(v.decode() if isinstance(v, bytes) else v) for v in got[name]] == [str(v) for v in value]
        else:
            assert got[name].shape == value.shape
            np.testing.assert_allclose(got[name].astype(np.float64), value.astype(np.float64), rtol=0.02, atol=0.02)


@pytest.fixture(scope="module")
def served(start_server: StartServer) -> Iterator[tuple[TorchServe, str, str]]:
    for model in MODELS:
        built_archive(model)
    server = start_server(MODELS)
    rest = frontproc.start(server.run_dir, server.props, server.url("inference"), MODELS, None, timeout=120)
    yield server, rest.removeprefix("http://"), f"127.0.0.1:{server.props['front_grpc_port']}"
    server.stop()  # five models: not kept for the rest of the session (the suite shares 24 GiB)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_tritonclient_speaks_to_every_model(served: tuple[TorchServe, str, str], protocol: str) -> None:
    server, rest, grpc_address = served
    client: Any = triton_http.InferenceServerClient(rest) if protocol == "rest" else \
        triton_grpc.InferenceServerClient(grpc_address)
    module: Any = triton_http if protocol == "rest" else triton_grpc
    assert client.is_server_live() and client.is_server_ready()
    for model in MODELS:
        assert client.is_model_ready(model)
        declared = yaml.safe_load((ROOT / "config" / "models" / f"{model}.yaml").read_text())["v2"]
        metadata = client.get_model_metadata(model, as_json=True) if protocol == "grpc" else \
            client.get_model_metadata(model)
        for key in ("inputs", "outputs"):
            got = [{"name": t["name"], "datatype": t["datatype"], "shape": [int(s) for s in t["shape"]]}
                   for t in metadata[key]]
            assert got == declared[key], (model, key)
        name, datatype, array = inputs_for(model)
        tensor = module.InferInput(name, list(array.shape), datatype)
        if protocol == "rest" and datatype == "BYTES":  # UTF-8 strings: base64 images, plain text
            tensor.set_data_from_numpy(np.array([x.encode() for x in as_json_strings(model, array)], dtype=np.object_))
        else:
            tensor.set_data_from_numpy(array)
        result = client.infer(model, [tensor])
        expected = direct(server, model)
        agrees(model, {n: result.as_numpy(n) for n in expected}, expected)


KSERVE_CLIENTS = r"""
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from tests.v2_inputs import as_json_strings, inputs_for

rest_url, grpc_address, models = sys.argv[1], sys.argv[2], sys.argv[3].split(",")

async def main():
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
    grpc = InferenceGRPCClient(grpc_address, timeout=120)
    found = {"rest_live": await rest.is_server_live(rest_url), "rest_ready": await rest.is_server_ready(rest_url),
             "grpc_live": (await grpc.is_server_live()), "grpc_ready": (await grpc.is_server_ready()), "models": {}}
    for model in models:
        name, datatype, array = inputs_for(model)
        as_json = InferInput(name, list(array.shape), datatype)
        as_json.set_data_from_numpy(as_json_strings(model, array) if datatype == "BYTES" else array, binary_data=False)
        over_rest = await rest.infer(rest_url, InferRequest(model_name=model, infer_inputs=[as_json]), model_name=model)
        raw = InferInput(name, list(array.shape), datatype)
        raw.set_data_from_numpy(array, binary_data=True)
        over_grpc = await grpc.infer(InferRequest(model_name=model, infer_inputs=[raw]))
        found["models"][model] = {
            "ready": await rest.is_model_ready(rest_url, model) and await grpc.is_model_ready(model),
            "rest": {o.name: np.asarray(o.as_numpy()).tolist() for o in over_rest.outputs},
            "grpc": {o.name: np.asarray(o.as_numpy()).tolist() for o in over_grpc.outputs}}
    await rest.close()
    await grpc.close()
    print(json.dumps(found, default=lambda v: v.decode() if isinstance(v, bytes) else str(v)))

asyncio.run(main())
"""


def test_the_kserve_package_clients_speak_to_every_model(served: tuple[TorchServe, str, str]) -> None:
    server, rest, grpc_address = served
    run = subprocess.run([sys.executable, "-c", KSERVE_CLIENTS, f"http://{rest}", grpc_address, ",".join(MODELS)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["rest_live"] and found["rest_ready"] and found["grpc_live"] and found["grpc_ready"]
    for model in MODELS:
        expected = direct(server, model)
        assert found["models"][model]["ready"]
        for protocol in ("rest", "grpc"):
            got = {n: np.array(v) for n, v in found["models"][model][protocol].items()}
            agrees(model, got, expected)


def test_bad_input_through_the_front_is_a_client_error_naming_the_cause(served: tuple[TorchServe, str, str]) -> None:
    server, rest, grpc_address = served
    body = {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 63}]}
    answer = requests.post(f"http://{rest}/v2/models/digits_tensor/infer", json=body, timeout=60)
    direct = requests.post(f"{server.url('inference')}/v2/models/digits_tensor/infer", json=body, timeout=60)
    # TorchServe's own 4xx (422: the values do not fill the shape), in KServe's {"error": message} form
    assert answer.status_code == direct.status_code == 422 and "63" in answer.json()["error"]
    binary = requests.post(f"http://{rest}/v2/models/digits_tensor/infer", data=b"\0" * 8,
                           headers={"Inference-Header-Content-Length": "4"}, timeout=60)
    assert binary.status_code == 400 and "error" in binary.json()  # KServe's decoder's answer to a broken header
    jpeg = triton_http.InferInput("image", [1], "BYTES")  # raw bytes over REST: KServe reads BYTES as UTF-8
    jpeg.set_data_from_numpy(np.array([b"\xff\xd8\xff\xe0 not UTF-8"], dtype=np.object_))
    refused = triton_http.InferenceServerClient(rest)
    with pytest.raises(InferenceServerException, match="UTF-8") as caught:
        refused.infer("digits", [jpeg])
    assert caught.value.status() == "400"
    client = triton_grpc.InferenceServerClient(grpc_address)
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
        client.infer("digits", [tensor])


def test_prod_front_refuses_calls_without_the_token(start_server: StartServer, tmp_path: Path) -> None:
    built_archive("digits_tensor")
    server = start_server(["digits_tensor"], config=PROD_CONFIG)
    rest = frontproc.start(server.run_dir, server.props, server.url("inference"), ["digits_tensor"],
                           server.run_dir / KEY_FILE, timeout=120)
    front_pid = int((server.run_dir / frontproc.PID_FILE).read_text())
    addresses = {a.ip for a in listening_addresses(front_pid)}  # KServe alone would bind every interface
    assert addresses and addresses <= {"127.0.0.1", "::ffff:127.0.0.1"}, addresses
    key = server.key("inference")
    good, bad = {"Authorization": f"Bearer {key}"}, {"Authorization": "Bearer wrong"}
    assert requests.get(f"{rest}/v2/health/live", timeout=10).status_code == 200  # liveness stays open
    for path in ("/v2/health/ready", "/v2/models/digits_tensor", "/v2/models/digits_tensor/ready", "/v2"):
        assert requests.get(f"{rest}{path}", timeout=10).status_code == 401
        assert requests.get(f"{rest}{path}", headers=bad, timeout=10).status_code == 401
        assert requests.get(f"{rest}{path}", headers=good, timeout=10).status_code == 200
    name, datatype, array = inputs_for("digits_tensor")
    tensor_json = {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.ravel().tolist()}
    body = {"inputs": [tensor_json]}
    assert requests.post(f"{rest}/v2/models/digits_tensor/infer", json=body, timeout=60).status_code == 401
    assert requests.post(f"{rest}/v2/models/digits_tensor/infer", json=body, headers=good, timeout=60).ok
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.props['front_grpc_port']}")
    assert client.is_server_live()
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        client.is_server_ready()
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        client.get_model_metadata("digits_tensor", headers={"authorization": "Bearer wrong"})
    assert client.is_server_ready(headers={"authorization": f"Bearer {key}"})
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    assert client.infer("digits_tensor", [tensor], headers={"authorization": f"Bearer {key}"}).as_numpy("logits") \
        .shape == (3, 10)
    assert server.stop() and not (server.run_dir / frontproc.PID_FILE).exists()  # make stop takes the front too


def test_a_body_over_max_request_size_is_413_on_every_rest_path(served: tuple[TorchServe, str, str]) -> None:
    _, rest, _ = served
    url = f"http://{rest}/v2/models/digits/infer"
    huge = b"x" * (MAX_REQUEST_SIZE + 1)
    for headers in ({"Content-Type": "application/json"}, {"Inference-Header-Content-Length": "2"}):
        answer = requests.post(url, data=huge, headers=headers, timeout=60)
        assert answer.status_code == 413 and "max_request_size" in answer.json()["error"], answer.text
    streamed = requests.post(url, data=iter([huge[:1 << 20]] * 7), timeout=60)  # chunked: no Content-Length
    assert streamed.status_code == 413
    assert requests.get(f"http://{rest}/v2/models/digits/ready", timeout=10).status_code == 200


def test_torchserve_error_bodies_become_kserve_error_messages() -> None:
    assert error_message(b'{"outputs": [{"name": "error", "datatype": "BYTES", "data": ["too big"]}]}') == "too big"
    assert error_message(b'{"error": "bad shape"}') == "bad shape"
    assert error_message(b'{"code": 503, "type": "ServiceUnavailableException", "message": "busy"}') == "busy"
    assert error_message(b"Worker died.") == "Worker died."
    assert error_message(b"{}") is None


def test_the_front_cost_bench_reports_every_path(tmp_path: Path) -> None:
    from loadtest import front_cost

    assert front_cost.main(["--models", "digits", "--duration", "1", "--rounds", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "front-cost.json").read_text())["models"]["digits"]
    for path in ("direct", "front", "front_binary"):
        assert report[path]["req_per_s"] > 0 and report[path]["failed"] == 0, (path, report[path])
    assert report["front"]["ratio"] > 0 and report["front_binary"]["ratio"] > 0
    assert "front (binary extension)" in (tmp_path / "front-cost.md").read_text()
