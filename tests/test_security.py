"""Secure defaults, live on the prod profile: tokens on every protected API (REST and gRPC), no remote or relative
archive URLs, no secrets from the environment in workers, loopback only; and no weights loaded through pickle."""

from __future__ import annotations

import ast
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import requests

from tests.conftest import ROOT, StartServer, built_archive
from tests.test_reliability import fault_archive
from tests.test_rollout import PROD
from tsforge.clients.grpc_client import GrpcClient, as_input_map
from tsforge.clients.grpc_stubs import stubs
from tsforge.serving.server import KeyKind, TorchServe, read_properties

pytestmark = pytest.mark.integration

SECRETS = {"TSFORGE_TEST_API_KEY": "k-1", "TSFORGE_TEST_TOKEN": "t-1", "TSFORGE_TEST_SECRET": "s-1",
           "TSFORGE_TEST_DB_PASSWORD": "p-1", "tsforge_test_aws_secret_access_key": "a-1"}
VISIBLE = "TSFORGE_TEST_VISIBLE"
WRONG = {"Authorization": "Bearer not-the-key"}


@pytest.fixture(scope="module")
def server(start_server: StartServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    store = tmp_path_factory.mktemp("secure_store")
    shutil.copy2(built_archive("digits"), store / "digits.mar")
    fault_archive(store, "probe", {}, minWorkers=1, maxWorkers=1)  # reports the worker's environment names
    saved = dict(os.environ)
    os.environ.update({**SECRETS, VISIBLE: "1"})
    try:
        yield start_server(["digits", "probe"], store=store, config=PROD)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def refused(response: requests.Response) -> bool:
    return response.status_code in (400, 401, 403)


def rest_calls(server: TorchServe) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, URL, requests kwargs): one call of every kind on the inference and management APIs."""
    inference, management = server.url("inference"), server.url("management")
    body = {"data": [[0.0] * 8] * 8}
    v2 = {"inputs": [{"name": "x", "shape": [1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
    return [
        ("GET", f"{inference}/ping", {}),
        ("POST", f"{inference}/predictions/digits", {"json": body}),
        ("POST", f"{inference}/predictions/digits/1.0", {"json": body}),
        ("POST", f"{inference}/v2/models/digits/infer", {"json": v2}),
        ("GET", f"{inference}/v2/health/ready", {}),
        ("GET", f"{inference}/v2/health/live", {}),
        ("OPTIONS", f"{inference}/ping", {}),
        ("OPTIONS", f"{inference}/predictions/digits", {}),
        ("OPTIONS", f"{inference}/v2/models/digits/infer", {}),
        ("OPTIONS", f"{inference}/v2/health/live", {}),
        ("GET", f"{management}/models", {}),
        ("OPTIONS", f"{management}/models", {}),
        ("OPTIONS", f"{management}/models/digits", {}),
        ("GET", f"{management}/token", {"params": {"type": "inference"}}),
        ("GET", f"{management}/models/digits", {}),
        ("PUT", f"{management}/models/digits", {"params": {"min_worker": 1}}),
        ("PUT", f"{management}/models/digits/1.0/set-default", {}),
        ("POST", f"{management}/models", {"params": {"url": "digits.mar", "model_name": "again"}}),
        ("DELETE", f"{management}/models/probe", {}),
    ]


@pytest.mark.parametrize("headers", [{}, WRONG], ids=["no token", "wrong token"])
def test_every_rest_api_refuses_without_the_right_token(server: TorchServe, headers: dict[str, str]) -> None:
    answers = {f"{method} {url}": requests.request(method, url, headers=headers, timeout=10, **kwargs)
               for method, url, kwargs in rest_calls(server)}
    assert {call: r.status_code for call, r in answers.items() if not refused(r)} == {}
    assert len(requests.get(server.url("management") + "/models/probe", headers=server.auth("management"),
                            timeout=10).json()[0]["workers"]) == 1  # the DELETE did not happen


def test_the_inference_key_does_not_open_management_nor_the_reverse(server: TorchServe) -> None:
    assert refused(requests.get(server.url("management") + "/models", headers=server.auth("inference"), timeout=10))
    assert refused(requests.get(server.url("inference") + "/ping", headers=server.auth("management"), timeout=10))
    assert requests.get(server.url("inference") + "/ping", headers=server.auth("inference"),
                        timeout=10).json()["status"] == "Healthy"


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready"])
def test_open_inference_health_needs_the_inference_key(server: TorchServe, path: str) -> None:
    """TorchServe 0.12 checks the inference key on liveness and readiness too (unlike tsforge's v2 front, which
    leaves liveness open): no key, a wrong one and the management key are refused; the inference key answers."""
    url = server.url("inference") + path
    for headers in ({}, WRONG, server.auth("management")):
        assert refused(requests.get(url, headers=headers, timeout=10)), headers
    answer = requests.get(url, headers=server.auth("inference"), timeout=10)
    assert answer.status_code == 200 and answer.json() == {path.rsplit("/", 1)[1]: True}, answer.text


STATIC_DESCRIPTION = {  # OPTIONS / on each API: TorchServe 0.12's fixed list of its endpoints
    "inference": {"/", "/api-description", "/metrics", "/ping", "/predictions/{model_name}",
                  "/predictions/{model_name}/{model_version}", "/v1/models/{model_name}:predict",
                  "/v2/models/{model_name}/infer"},
    "management": {"/", "/api-description", "/metrics", "/models", "/models/{model_name}",
                   "/models/{model_name}/{model_version}", "/models/{model_name}/{model_version}/set-default"},
}


@pytest.mark.parametrize("api", ["inference", "management"])
def test_options_without_a_token_answers_only_the_static_api_description(server: TorchServe, api: KeyKind) -> None:
    """What TorchServe 0.12 answers without a key (docs/security.md): `OPTIONS /` and `/api-description` give its
    generic OpenAPI description, the same bytes a key holder gets: the version and the endpoint list, no model
    name, no key, nothing about this deployment. OPTIONS on any other path needs the key (see rest_calls)."""
    base = server.url(api)
    keys = {entry["key"] for entry in json.loads((server.run_dir / "key_file.json").read_text()).values()}
    for method, path in (("OPTIONS", "/"), ("OPTIONS", "/api-description"), ("GET", "/api-description")):
        anonymous = requests.request(method, base + path, timeout=10)
        assert anonymous.status_code == 200, (method, path, anonymous.text[:200])
        assert anonymous.content == requests.request(method, base + path, headers=server.auth(api),
                                                     timeout=10).content
        description = anonymous.json()
        assert set(description["paths"]) == STATIC_DESCRIPTION[api]
        assert description["info"]["version"] == "0.12.0"
        assert not [word for word in ("digits", "probe", *keys) if word in anonymous.text]
    # Only the description: every other method on / is refused.
    assert {requests.request(m, base + "/", timeout=10).status_code for m in ("GET", "POST", "PUT", "DELETE")} \
        == {405}


def test_metrics_api_exposes_counters_only_on_loopback(server: TorchServe) -> None:
    # TorchServe 0.12 does not put the metrics API behind a token: it answers, and so must listen on loopback only.
    assert requests.get(server.url("metrics") + "/metrics", timeout=10).status_code == 200
    assert server.url("metrics").startswith("http://127.0.0.1:")


def grpc_calls(client: GrpcClient) -> list[tuple[str, Any]]:
    m = client.s.management
    return [
        ("ping", client.ping),
        ("predict", lambda: client.predict("digits", as_input_map([[0.0] * 8] * 8))),
        ("describe", lambda: client.describe("digits")),
        ("register", lambda: client.register("digits.mar", "again")),
        ("set_default", lambda: client.set_default("digits", "1.0")),
        ("scale", lambda: client._manage("ScaleWorker", m.ScaleWorkerRequest(model_name="digits", min_worker=1))),
        ("unregister", lambda: client.unregister("probe")),
    ]


@pytest.mark.parametrize("token", [None, "not-the-key"], ids=["no token", "wrong token"])
def test_every_grpc_call_refuses_without_the_right_token(server: TorchServe, token: str | None) -> None:
    with GrpcClient(server, timeout=10) as client:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        client._metadata = lambda kind: metadata  # type: ignore[method-assign]
        codes = {}
        for name, call in grpc_calls(client):
            with pytest.raises(grpc.RpcError) as denied:
                call()
            codes[name] = denied.value.code()
    assert set(codes.values()) <= {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}, codes


def test_the_open_inference_grpc_service_refuses_without_a_token(server: TorchServe) -> None:
    s = stubs()
    with grpc.insecure_channel(f"127.0.0.1:{server.props['grpc_inference_port']}") as channel:
        stub = s.open_inference_grpc.GRPCInferenceServiceStub(channel)
        for call, request in ((stub.ServerReady, s.open_inference.ServerReadyRequest()),
                              (stub.ModelReady, s.open_inference.ModelReadyRequest(name="digits"))):
            with pytest.raises(grpc.RpcError) as denied:
                call(request, metadata=(("authorization", "Bearer not-the-key"),), timeout=10)
            assert denied.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


@pytest.mark.parametrize("url", [
    # not s3://: TorchServe 0.12 reads a non-http URL's last segment as a file name in the local store
    "http://127.0.0.1:1/digits.mar", "https://example.com/digits.mar", "file:///etc/passwd", "../digits.mar",
    "../../model_store/digits.mar", "/etc/hostname",
])
def test_registration_refuses_remote_and_relative_archive_urls(server: TorchServe, url: str) -> None:
    answer = requests.post(server.url("management") + "/models", params={"url": url, "model_name": "intruder"},
                           headers=server.auth("management"), timeout=30)
    assert 400 <= answer.status_code < 500, answer.text
    listed = requests.get(server.url("management") + "/models", headers=server.auth("management"), timeout=10).json()
    assert "intruder" not in {m["modelName"] for m in listed["models"]}


def test_workers_see_no_secret_from_the_environment(server: TorchServe) -> None:
    described = requests.get(server.url("management") + "/models/probe", params={"customized": "true"},
                             headers=server.auth("management"), timeout=30).json()
    metadata = described[0]["customizedMetadata"]
    environment = set((json.loads(metadata) if isinstance(metadata, str) else metadata)["environment"])
    assert VISIBLE in environment  # the probe does see the environment it is given
    assert not environment & set(SECRETS), environment & set(SECRETS)
    frontend = psutil.Process(int(server.pid_file.read_text())).children(recursive=True)
    assert any(set(SECRETS) <= set(p.environ()) for p in frontend)  # the frontend had them to pass on


def listening_addresses(pid: int) -> list[Any]:
    """The addresses the process `pid` and its descendants listen on (psutil < 6 calls it `connections`)."""
    tree = psutil.Process(pid)
    found = []
    for process in [tree, *tree.children(recursive=True)]:
        connections = getattr(process, "net_connections", None) or process.connections
        found += [c.laddr for c in connections("inet") if c.status == psutil.CONN_LISTEN]
    return found


def test_every_listening_socket_is_loopback(server: TorchServe) -> None:
    listening = listening_addresses(int(server.pid_file.read_text()))
    assert len(listening) >= 5  # inference, management, metrics, gRPC inference and management
    assert {address.ip for address in listening} <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, listening
    assert all(value.startswith(("http://127.0.0.1", "127.0.0.1")) or not value
               for key, value in read_properties(PROD).items() if key.endswith("_address"))


# ---- no weights through pickle ----------------------------------------------------------------------------------

SOURCES = ("handlers", "export", "tsforge", "loadtest")


def calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def keyword(call: ast.Call, name: str) -> Any:
    found = next((k.value for k in call.keywords if k.arg == name), None)
    return found.value if isinstance(found, ast.Constant) else found


def test_no_weights_are_loaded_through_pickle() -> None:
    offending = []
    for path in sorted(p for folder in SOURCES for p in (ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        imports = {alias.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                   for alias in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        where = path.relative_to(ROOT)
        if imports & {"pickle", "cPickle", "dill", "joblib", "cloudpickle"}:
            offending.append(f"{where}: imports a pickle module")
        for name, call in calls(tree):
            if name.endswith("torch.load") and keyword(call, "weights_only") is not True:
                offending.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
            if name.endswith(("np.load", "numpy.load")) and keyword(call, "allow_pickle") is not False:
                offending.append(f"{where}:{call.lineno}: np.load without allow_pickle=False")
            if name.endswith(("pd.read_pickle", "torch.package.PackageImporter")):
                offending.append(f"{where}:{call.lineno}: {name}")
    assert offending == []


def test_archives_carry_no_pickled_weights() -> None:
    import zipfile

    for mar in sorted((ROOT / "model_store").glob("*.mar")):
        names = zipfile.ZipFile(mar).namelist()
        assert not [n for n in names if Path(n).suffix in {".pkl", ".pickle", ".pth", ".bin", ".joblib"}], mar
