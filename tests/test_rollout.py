"""Zero-downtime rollout and rollback of digits 1.0 -> 2.0 -> 1.0 under load, prod profile (token auth on)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, StartServer, built_archive
from tsforge.clients import deploy
from tsforge.packaging import archive
from tsforge.serving.server import TorchServe

pytestmark = pytest.mark.integration
PROD = ROOT / "config" / "prod.properties"


def versioned_store(root: Path, versions: dict[str, str]) -> Path:
    """A model store with digits built at each version: {archive name: version}, e.g. {"digits": "1.0"}."""
    built_archive("digits")  # the export the archives are built from
    root.mkdir(parents=True, exist_ok=True)
    for name, version in versions.items():
        archive.build(archive.plan("digits", version=version, store=root, archive_name=name))
    return root


@pytest.fixture(scope="module")
def server(start_server: StartServer, tmp_path_factory: pytest.TempPathFactory) -> TorchServe:
    store = versioned_store(tmp_path_factory.mktemp("store"), {"digits": "1.0", "digits-2.0": "2.0"})
    return start_server(["digits"], store=store, config=PROD)


@dataclass(frozen=True)
class Answer:
    started: float
    ended: float
    status: int
    version: str | None


def example(server: TorchServe) -> dict[str, object]:
    cases = json.loads((ROOT / "build" / "digits" / "examples.json").read_text())
    return dict(cases[0])


class Load:
    """A bounded pool of clients sending real requests until stopped."""

    def __init__(self, server: TorchServe, clients: int = 4) -> None:
        self.url = server.url("inference") + "/predictions/digits"
        self.headers = server.auth("inference")
        self.case = example(server)
        self.stop = threading.Event()
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(clients)
        self.futures = [self.pool.submit(self._client) for _ in range(clients)]

    def _client(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                r = session.post(self.url, json=self.case["input"], headers=self.headers, timeout=30)
                ok = r.status_code == 200 and r.json().get("label") == self.case["expect"]["label"]  # type: ignore[index]
                answer = Answer(started, time.monotonic(), r.status_code if ok else -r.status_code,
                                r.headers.get("X-Model-Version"))
            except requests.RequestException:
                answer = Answer(started, time.monotonic(), 0, None)
            with self.lock:
                self.answers.append(answer)

    def finish(self) -> list[Answer]:
        self.stop.set()
        for future in self.futures:
            future.result()
        self.pool.shutdown()
        return self.answers


def test_token_authorization_is_on(server: TorchServe) -> None:
    inference = server.url("inference")
    assert requests.get(inference + "/ping", timeout=10).status_code in (400, 401)
    assert requests.post(inference + "/predictions/digits", data=b"x", timeout=10).status_code in (400, 401)
    wrong_key = server.auth("management")  # the management key does not open the inference API
    assert requests.get(inference + "/ping", headers=wrong_key, timeout=10).status_code in (400, 401)
    register = requests.post(server.url("management") + "/models", params={"url": "digits-2.0.mar"}, timeout=10)
    assert register.status_code in (400, 401)
    assert requests.get(inference + "/ping", headers=server.auth("inference"), timeout=10).json()["status"] == "Healthy"


def test_rollout_and_rollback_under_load_lose_no_request(server: TorchServe) -> None:
    load = Load(server)
    time.sleep(1.5)
    deploy_started = time.monotonic()
    deploy.deploy(server, "digits", "2.0", server.model_store)
    deployed = time.monotonic()
    time.sleep(1.5)
    rollback_started = time.monotonic()
    assert deploy.rollback(server, "digits") == "1.0"
    rolled_back = time.monotonic()
    time.sleep(1.5)
    answers = load.finish()

    assert [a for a in answers if a.status != 200] == []
    before = [a.version for a in answers if a.ended < deploy_started]
    during_2 = [a.version for a in answers if deployed < a.started and a.ended < rollback_started]
    after = [a.version for a in answers if a.started > rolled_back]
    assert before and set(before) == {"1.0"}
    assert during_2 and set(during_2) == {"2.0"}
    assert after and set(after) == {"1.0"}
    assert len(answers) > 50


def test_undeploy_refuses_the_default_and_removes_an_old_version(server: TorchServe) -> None:
    api = deploy.Management(server)
    assert api.default("digits") == "1.0" and set(api.versions("digits")) == {"1.0", "2.0"}
    with pytest.raises(deploy.DeployError, match="is the default"):
        deploy.undeploy(server, "digits", "1.0")
    deploy.undeploy(server, "digits", "2.0")
    assert set(api.versions("digits")) == {"1.0"}
    assert deploy.History(server.run_dir).get("digits") == ["1.0"]
    with pytest.raises(deploy.DeployError, match="no earlier default"):
        deploy.rollback(server, "digits")
