"""Operations on a real TorchServe (prod profile): restart keeps versions and defaults, `make metrics`, log files."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import requests

from tests.conftest import ROOT, StartServer, configured_workers
from tests.test_rollout import PROD, versioned_store
from tsforge.clients import deploy
from tsforge.clients.predict import archive_examples
from tsforge.serving.server import TorchServe

pytestmark = pytest.mark.integration


def ask(server: TorchServe, version: str | None = None, body: object = None) -> requests.Response:
    example = archive_examples(server.model_store / "digits.mar")[0]
    url = server.url("inference") + "/predictions/digits" + (f"/{version}" if version else "")
    return requests.post(url, json=example["input"] if body is None else body, headers=server.auth("inference"),
                         timeout=30)


def test_restart_keeps_versions_and_defaults(start_server: StartServer,
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    store = versioned_store(tmp_path_factory.mktemp("store"), {"digits": "1.0", "digits-2.0": "2.0"})
    run_dir = tmp_path_factory.mktemp("run")
    first = start_server(["digits"], store=store, config=PROD, snapshots=True, run_dir=run_dir)
    deploy.deploy(first, "digits", "2.0", store)
    assert ask(first).headers["X-Model-Version"] == "2.0"
    old_key = first.key("inference")
    first.stop()

    second = start_server(["digits"], store=store, config=PROD, snapshots=True, run_dir=run_dir)
    api = deploy.Management(second)
    for version in ("1.0", "2.0"):
        api.wait_ready("digits", version)
    assert api.default("digits") == "2.0" and set(api.versions("digits")) == {"1.0", "2.0"}
    assert second.key("inference") != old_key  # a restart issues new keys; clients read them from the run folder
    assert ask(second).headers["X-Model-Version"] == "2.0"
    assert ask(second, "1.0").headers["X-Model-Version"] == "1.0"
    assert deploy.rollback(second, "digits") == "1.0"  # the deploy history survives too
    assert ask(second).headers["X-Model-Version"] == "1.0"


@pytest.fixture(scope="module")
def server(start_server: StartServer, tmp_path_factory: pytest.TempPathFactory) -> TorchServe:
    store = versioned_store(tmp_path_factory.mktemp("store"), {"digits": "1.0"})
    return start_server(["digits"], store=store, config=PROD)


def test_make_metrics_shows_health_readiness_and_handler_metrics(server: TorchServe) -> None:
    for _ in range(5):
        assert ask(server).status_code == 200
    assert ask(server, body={"data": "not//base64!!"}).status_code == 400
    deadline = time.monotonic() + 15  # handler metrics reach the frontend through the worker's log
    while True:
        done = subprocess.run(["make", "-s", "metrics", f"RUN_DIR={server.run_dir}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        out = done.stdout
        if "HandlerRequestErrors_total" in out or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    workers = configured_workers("digits")
    assert "health: Healthy" in out and f"* digits 1.0: {workers}/{workers}" in out
    for name in ("HandlerInferenceTime{ModelName=digits, ModelVersion=1.0}",
                 "HandlerBatchSize{ModelName=digits, ModelVersion=1.0}",
                 "HandlerRequestErrors_total{ErrorType=undecodable_input, ModelName=digits, ModelVersion=1.0} 1",
                 "ts_inference_requests_total{model_name=digits, model_version=default} 6"):
        assert name in out, out


def test_access_and_model_logs_go_to_separate_files(server: TorchServe) -> None:
    assert ask(server).status_code == 200
    logs = server.run_dir / "logs"
    deadline = time.monotonic() + 10
    while "/predictions/digits" not in (logs / "access_log.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    access = (logs / "access_log.log").read_text()
    assert "/predictions/digits" in access and "MODEL_LOG" not in access
    assert "DigitsHandler 1.0 ready" in (logs / "model_log.log").read_text()
    assert "/predictions/digits" not in (logs / "ts_log.log").read_text()
    key_file = server.run_dir / "key_file.json"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600" and json.loads(key_file.read_text())["inference"]["key"]
