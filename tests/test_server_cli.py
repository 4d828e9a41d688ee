"""`python -m tsforge.server`, as `make serve` and `make stop` call it: a relative run folder, and a fast,
clear failure when TorchServe exits during start-up."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import DEV_CONFIG, ROOT, built_archive
from tsforge.server import free_port_overrides, read_properties, write_properties

pytestmark = pytest.mark.integration


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tsforge.server", *args], cwd=ROOT, capture_output=True,
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
