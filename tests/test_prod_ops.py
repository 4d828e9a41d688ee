"""Operating the prod profile, live: keys that expire and are renewed (TorchServe's token API and tsforge's own
clients), a frozen host (enable_model_api=false) that refuses a deploy and keeps serving what it served, and the
`auto` choice cache each test server gets to itself (tests/conftest.py)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.conftest import CACHE_ENV, StartServer
from tests.test_rollout import PROD, versioned_store
from tsforge.clients import deploy
from tsforge.clients.grpc_client import GrpcClient
from tsforge.serving.server import KEY_FILE, KeyKind, TorchServe

pytestmark = pytest.mark.integration

# TorchServe 0.12 reads token_expiration_min as a double and keeps whole seconds (minutes x 60, truncated):
# 0.1 gives keys that live 6 s, long enough for a request on a loaded 2-core box, short enough to wait out.
EXPIRY_MIN = 0.1
EXPIRY_S = EXPIRY_MIN * 60
PROBES: dict[KeyKind, str] = {"inference": "/ping", "management": "/models"}  # one call that needs each key


@pytest.fixture(scope="module")
def expiring(start_server: StartServer, tmp_path_factory: pytest.TempPathFactory) -> TorchServe:
    """prod with keys that expire after 6 s; start_server's readiness polling already renews them as it goes."""
    store = versioned_store(tmp_path_factory.mktemp("expiring_store"), {"digits": "1.0"})
    return start_server(["digits"], store=store, config=PROD, overrides={"token_expiration_min": str(EXPIRY_MIN)})


@pytest.fixture(scope="module")
def frozen(start_server: StartServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[TorchServe, Path]:
    """prod frozen with enable_model_api=false, serving digits 1.0, with digits 2.0 in its store to deploy."""
    store = versioned_store(tmp_path_factory.mktemp("frozen_store"), {"digits": "1.0", "digits-2.0": "2.0"})
    return start_server(["digits"], store=store, config=PROD, overrides={"enable_model_api": "false"}), store


def key_file(server: TorchServe) -> dict[str, Any]:
    return dict(json.loads((server.run_dir / KEY_FILE).read_text()))


def expires(entry: dict[str, Any]) -> datetime:
    """A key's `expiration time`: Java's Instant.toString(), UTC with up to nine fractional digits."""
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", entry["expiration time"]).replace("Z", "+00:00"))


def status_with(server: TorchServe, kind: KeyKind, key: str) -> int:
    return requests.get(server.url(kind) + PROBES[kind], headers={"Authorization": f"Bearer {key}"},
                        timeout=10).status_code


def renew(server: TorchServe, kind: KeyKind, key: str) -> requests.Response:
    """TorchServe's token API: a new `kind` key, asked for with `key` (only the token-API key may)."""
    return requests.get(server.url("management") + "/token", params={"type": kind},
                        headers={"Authorization": f"Bearer {key}"}, timeout=10)


def wait_until_expired(*entries: dict[str, Any]) -> None:
    """Sleep past the latest of these keys' expiry (bounded: a key never lives longer than EXPIRY_S)."""
    left = max(expires(e) for e in entries).timestamp() - datetime.now(timezone.utc).timestamp()
    assert left <= EXPIRY_S + 1, f"a key lives {left:.1f} s more, over token_expiration_min={EXPIRY_MIN}"
    time.sleep(max(0.0, left) + 1.0)


@pytest.mark.parametrize("kind", ["inference", "management"])
def test_the_token_api_renews_a_key_and_retires_the_old_one_at_once(expiring: TorchServe, kind: KeyKind) -> None:
    keys = key_file(expiring)
    for other in ("", keys["inference"]["key"], keys["management"]["key"]):  # only the token-API key renews
        assert renew(expiring, kind, other).status_code == 400
    assert key_file(expiring)[kind]["key"] == keys[kind]["key"]
    assert renew(expiring, kind, keys["API"]["key"]).status_code == 200
    old = key_file(expiring)[kind]
    assert status_with(expiring, kind, old["key"]) == 200
    assert renew(expiring, kind, keys["API"]["key"]).status_code == 200
    new = key_file(expiring)[kind]
    assert new["key"] != old["key"] and status_with(expiring, kind, new["key"]) == 200
    assert status_with(expiring, kind, old["key"]) == 400
    assert expires(old) > datetime.now(timezone.utc)  # refused because it was replaced, not because it expired


def test_an_expired_key_is_refused_and_tsforges_clients_renew_it(expiring: TorchServe) -> None:
    """Both keys fresh, then past their expiry: TorchServe refuses them; a client attached from another process
    (as `make predict`, `make deploy` and the gRPC client are) renews each through the token API and is served."""
    api_key = key_file(expiring)["API"]["key"]
    for kind in PROBES:
        assert renew(expiring, kind, api_key).status_code == 200
    fresh = key_file(expiring)
    assert all(status_with(expiring, kind, fresh[kind]["key"]) == 200 for kind in PROBES)
    wait_until_expired(fresh["inference"], fresh["management"])
    assert {kind: status_with(expiring, kind, fresh[kind]["key"]) for kind in PROBES} == {
        "inference": 400, "management": 400}

    client = TorchServe.attach(expiring.run_dir)
    answer = requests.post(client.url("inference") + "/predictions/digits", json={"data": [[0.0] * 8] * 8},
                           headers=client.auth("inference"), timeout=30)
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == "1.0", answer.text
    assert deploy.Management(client).default("digits") == "1.0"
    renewed = key_file(expiring)
    assert {kind: renewed[kind]["key"] != fresh[kind]["key"] for kind in PROBES} == {
        "inference": True, "management": True}
    assert renewed["API"] == fresh["API"]  # the token-API key itself does not change
    wait_until_expired(renewed["inference"], renewed["management"])
    with GrpcClient(client, timeout=30) as grpc_client:  # gRPC metadata carries the renewed key too
        assert json.loads(grpc_client.ping())["status"] == "Healthy"
        assert grpc_client.describe("digits")[0]["modelVersion"] == "1.0"


def test_a_frozen_host_refuses_a_deploy_and_keeps_its_default(frozen: tuple[TorchServe, Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    server, store = frozen
    api = deploy.Management(server)
    before = api.versions("digits")
    assert list(before) == ["1.0"] and api.default("digits") == "1.0"
    code = deploy.main(["deploy", "digits", "2.0", "--run-dir", str(server.run_dir), "--store", str(store)])
    error = capsys.readouterr().err
    assert code == 1
    assert "refuses registration (enable_model_api=false" in error, error
    assert {version: [w["pid"] for w in workers] for version, workers in api.versions("digits").items()} == {
        version: [w["pid"] for w in workers] for version, workers in before.items()}
    assert api.default("digits") == "1.0"
    answer = requests.post(server.url("inference") + "/predictions/digits", json={"data": [[0.0] * 8] * 8},
                           headers=server.auth("inference"), timeout=30)
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == "1.0"
    assert "digits" not in deploy.History(server.run_dir).load()


# ---- each test server measures `auto` in a cache of its own ------------------------------------------------------

def worker_environments(server: TorchServe) -> Iterator[tuple[int, dict[str, str]]]:
    described = requests.get(server.url("management") + "/models/digits", headers=server.auth("management"),
                             timeout=10).json()
    for worker in described[0]["workers"]:
        yield int(worker["pid"]), psutil.Process(int(worker["pid"])).environ()


def test_each_server_measures_auto_in_a_cache_of_its_own(expiring: TorchServe, frozen: tuple[TorchServe, Path],
                                                         session_choice_cache: Path) -> None:
    home = Path.home() / ".cache" / "tsforge"
    caches = [Path(server.env[CACHE_ENV]) for server in (expiring, frozen[0])]
    assert len({*caches, session_choice_cache, home}) == 4
    for server, cache in zip((expiring, frozen[0]), caches, strict=True):
        pids = set()
        for pid, environment in worker_environments(server):
            assert environment[CACHE_ENV] == str(cache)
            pids.add(pid)
        choices = [json.loads(path.read_text()) for path in cache.glob("choice-*.json")]
        # One choice, measured here by one of this server's own workers, not found ready-made.
        assert len(choices) == 1 and choices[0]["measured"] is True and choices[0]["pid"] in pids, choices


def test_in_process_handlers_use_the_sessions_cache(session_choice_cache: Path) -> None:
    from handlers import autoselect

    assert autoselect.cache_dir() == session_choice_cache
    assert Path.home() / ".cache" not in session_choice_cache.parents
