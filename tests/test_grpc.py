"""gRPC against a real TorchServe (prod profile: keys in metadata): Ping, Predictions, RegisterModel, SetDefault."""

from __future__ import annotations

import json

import grpc
import pytest
import requests

from tests.conftest import ROOT, StartServer
from tests.test_rollout import PROD, versioned_store
from tsforge.clients.grpc_client import GrpcClient, as_input_map
from tsforge.clients.predict import archive_examples
from tsforge.serving.server import TorchServe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(start_server: StartServer, tmp_path_factory: pytest.TempPathFactory) -> TorchServe:
    store = versioned_store(tmp_path_factory.mktemp("store"), {"digits": "1.0", "digits-2.0": "2.0"})
    return start_server(["digits"], store=store, config=PROD)


@pytest.fixture
def client(server: TorchServe):
    with GrpcClient(server) as c:
        yield c


def test_ping(client: GrpcClient) -> None:
    assert json.loads(client.ping())["status"] == "Healthy"


def test_predictions_answer_every_stored_example(client: GrpcClient, server: TorchServe) -> None:
    examples = archive_examples(server.model_store / "digits.mar")
    for case in examples:
        answer = json.loads(client.predict("digits", as_input_map(case["input"])))
        assert answer["label"] == case["expect"]["label"]


def test_bad_input_over_grpc_is_a_json_error_and_the_worker_keeps_serving(client: GrpcClient) -> None:
    # TorchServe 0.12 sends a handler's 4xx over gRPC as an OK call; the status is in the JSON body.
    error = json.loads(client.predict("digits", {"data": b"\x00garbage\xff" * 8}))
    assert error["code"] == 400 and error["type"] == "undecodable_input" and error["message"]
    assert json.loads(client.ping())["status"] == "Healthy"


def test_a_key_is_required(server: TorchServe) -> None:
    with GrpcClient(server) as c:
        c.server = TorchServe.attach(server.run_dir)
        c._metadata = lambda kind: (("authorization", "Bearer not-the-key"),)  # type: ignore[method-assign]
        with pytest.raises(grpc.RpcError) as denied:
            c.ping()
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_register_and_set_default_over_grpc(client: GrpcClient, server: TorchServe) -> None:
    assert "2.0" not in [d["modelVersion"] for d in client.describe("digits", "all")]
    client.register("digits-2.0.mar", "digits")
    assert {d["modelVersion"] for d in client.describe("digits", "all")} == {"1.0", "2.0"}
    client.set_default("digits", "2.0")
    example = archive_examples(server.model_store / "digits-2.0.mar")[0]
    http = requests.post(server.url("inference") + "/predictions/digits", json=example["input"],
                         headers=server.auth("inference"), timeout=30)
    assert http.status_code == 200 and http.headers["X-Model-Version"] == "2.0"
    old = json.loads(client.predict("digits", as_input_map(example["input"]), "1.0"))
    assert old["label"] == example["expect"]["label"]
    client.set_default("digits", "1.0")
    client.unregister("digits", "2.0")
    assert [d["modelVersion"] for d in client.describe("digits", "all")] == ["1.0"]


def test_make_predict_grpc(server: TorchServe) -> None:
    import subprocess

    done = subprocess.run(["make", "-s", "predict-grpc", "MODEL=digits", f"RUN_DIR={server.run_dir}",
                           f"STORE={server.model_store}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == len(archive_examples(server.model_store / "digits.mar"))
