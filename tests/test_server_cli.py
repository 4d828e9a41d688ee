"""`python -m tsforge.serving.server`, as `make serve` and `make stop` call it: a relative run folder, a run folder at
any depth, and a fast, clear failure when TorchServe exits or a worker cannot start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests

from tests.conftest import DEV_CONFIG, ROOT, StartServer, built_archive
from tests.test_versions import TAMPERINGS, rewrite
from tsforge.serving.server import (
    SUN_PATH_MAX,
    LogTail,
    ServerError,
    TorchServe,
    free_port_overrides,
    model_args,
    read_properties,
    write_properties,
)

pytestmark = pytest.mark.integration


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tsforge.serving.server", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def free_port_config(tmp_path: Path) -> Path:
    props = {**read_properties(DEV_CONFIG), **free_port_overrides()}
    config = tmp_path / "config.properties"
    write_properties(config, props)
    return config


def test_start_and_stop_with_a_run_folder_relative_to_the_project(free_port_config: Path) -> None:
    built_archive("digits")
    run_dir = f"build/test-cli-{time.monotonic_ns()}"
    inference = read_properties(free_port_config)["inference_address"]
    try:
        started = cli("start", "--config", str(free_port_config), "--run-dir", run_dir, "--models", "digits")
        assert started.returncode == 0, started.stderr
        assert "TorchServe ready" in started.stdout
        assert requests.get(f"{inference}/ping", timeout=10).json()["status"] == "Healthy"
    finally:
        stopped = cli("stop", "--run-dir", run_dir)
    assert stopped.returncode == 0 and "TorchServe stopped" in stopped.stdout
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{inference}/ping", timeout=5)


def test_start_fails_fast_and_says_where_to_look_when_torchserve_exits(free_port_config: Path,
                                                                       tmp_path: Path) -> None:
    began = time.monotonic()
    result = cli("start", "--config", str(free_port_config), "--run-dir", str(tmp_path / "run"),
                 "--model-store", str(tmp_path / "no-such-store"), "--models", "digits", "--timeout", "120")
    assert result.returncode == 1
    assert "TorchServe exited during start-up" in result.stderr and "console.log" in result.stderr
    assert time.monotonic() - began < 60


def test_a_run_folder_at_any_depth_serves(start_server: StartServer, tmp_path_factory: pytest.TempPathFactory) -> None:
    archive = built_archive("digits")
    run_dir = tmp_path_factory.mktemp("deep") / ("d" * 60) / ("e" * 60) / "run"
    assert len(os.fsencode(run_dir / "tmp" / ".ts.sock.9000")) > SUN_PATH_MAX  # where the sockets used to be
    server = start_server(["digits"], run_dir=run_dir)
    example = json.loads(zipfile.ZipFile(archive).read("examples.json"))[0]
    answer = requests.post(server.url("inference") + "/predictions/digits", json=example["input"], timeout=30)
    assert answer.status_code == 200 and answer.json()["label"] == example["expect"]["label"]
    temp = server.temp_dir
    assert temp is not None and len(os.fsencode(temp / ".ts.sock.65535")) <= SUN_PATH_MAX
    assert temp.stat().st_mode & 0o777 == 0o700 and list(temp.glob(".ts.sock.*"))
    assert server.stop() and not temp.exists() and server.temp_dir is None


@pytest.fixture(scope="module")
def tampered_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("tampered-store")
    rewrite(built_archive("digits"), store / "digits.mar", *TAMPERINGS["handler_changed"][:2])
    return store


def test_a_worker_that_refuses_to_load_fails_start_up_fast_with_its_error(tampered_store: Path,
                                                                         tmp_path: Path) -> None:
    server = TorchServe(run_dir=tmp_path / "run", model_store=tampered_store, models=model_args(["digits"]),
                        overrides=free_port_overrides())
    began = time.monotonic()
    try:
        server.start()
        with pytest.raises(ServerError, match="refusing to load digits") as failed:
            server.wait_ready(["digits"], timeout=120)
        assert time.monotonic() - began < 30
        assert "handlers/base.py: SHA-256 differs from the version file" in str(failed.value)
    finally:
        server.stop()
    assert not server.alive() and server.temp_dir is None


def test_start_exits_non_zero_with_the_worker_error(tampered_store: Path, free_port_config: Path,
                                                    tmp_path: Path) -> None:
    began = time.monotonic()
    result = cli("start", "--config", str(free_port_config), "--run-dir", str(tmp_path / "run"),
                 "--model-store", str(tampered_store), "--models", "digits", "--timeout", "120")
    assert result.returncode == 1
    assert "failed to start" in result.stderr and "refusing to load digits" in result.stderr, result.stderr
    assert time.monotonic() - began < 30
    assert not TorchServe.attach(tmp_path / "run").alive() and not (tmp_path / "run" / "tmpdir").exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(read_properties(free_port_config)["inference_address"] + "/ping", timeout=5)


def test_log_tail_reads_complete_lines_and_a_rolled_over_file_anew(tmp_path: Path) -> None:
    log = tmp_path / "model_log.log"
    log.write_text("before start\n")
    tail = LogTail(log)
    with log.open("a") as out:
        out.write("one\ntw")
    assert tail.lines() == ["one"]
    with log.open("a") as out:
        out.write("o\n")
    assert tail.lines() == ["two"]
    log.write_text("new\n")  # rolled over: shorter than the position
    assert tail.lines() == ["new"]
