"""Shared fixtures: built archives, the digits split, and real TorchServe instances on free ports."""

from __future__ import annotations

import fcntl
import io
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from export.models.digits import load_split
from handlers import runtimes
from tsforge.serving.server import TorchServe, free_port_overrides, model_args

#: the tier check (unmarked tests start no server) and pytester, with which test_tiers runs it
pytest_plugins = ["tests.tiers", "pytester"]

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "model_store"
BUILD = ROOT / "build"
DEV_CONFIG = ROOT / "config" / "config.properties"
CACHE_ENV = "TSFORGE_CACHE_DIR"  # where `auto` records its choice (handlers/autoselect.py cache_dir)

StartServer = Callable[..., TorchServe]


def built_archive(name: str) -> Path:
    """The archive for `name`, (re)built through the Makefile so tests use what users get. One build at a time:
    the suite's test processes (pytest-xdist) share the build folder and the store."""
    BUILD.mkdir(exist_ok=True)
    with (BUILD / ".suite-build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(["make", "-s", f"model_store/{name}.mar", f"MODELS={name}"], cwd=ROOT, check=True)
    return STORE / f"{name}.mar"


def configured_workers(name: str) -> int:
    """The worker count that config/models/NAME.yaml gives the archive."""
    import yaml

    return int(yaml.safe_load((ROOT / "config" / "models" / f"{name}.yaml").read_text())["maxWorkers"])


def offline_runner(model: str, selection: dict[str, Any], *, channels_last: bool = False) -> runtimes.Runner:
    """The variant a server chose, loaded here from the export folder: the same program, in-process."""
    import yaml

    variant = runtimes.Variant(selection["backend"], selection["precision"], selection["fusion"])
    artefacts = runtimes.Artefacts.read(BUILD / model, f"{model}.pt")
    handler = yaml.safe_load((ROOT / "config" / "models" / f"{model}.yaml").read_text()).get("handler") or {}
    return runtimes.load(variant, artefacts, torch.device("cpu"), channels_last=channels_last,
                         cast=handler.get("reduced_precision", "cast"))


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session", autouse=True)
def session_choice_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty `auto` choice cache for the whole session, before any test runs: a choice recorded in the user's
    ~/.cache/tsforge would let auto skip its measurement in every test, and tests must not write there either.
    In-process handlers and any TorchServe not started by `start_server` (the soak's, `make` targets') use it."""
    cache = tmp_path_factory.mktemp("choice_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        yield cache


@pytest.fixture(scope="session", autouse=True)
def every_variant() -> Iterator[None]:
    """The suite serves and checks every variant a model declares: each `make` it runs (built_archive, bench, ...)
    builds them all (`VARIANTS=all`; `make archive` alone leaves AOTInductor out, export/wanted.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VARIANTS", "all")
        yield


@pytest.fixture(scope="session")
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return load_split()


#: every TorchServe the tests started, and whether it serves the whole session (else only its module)
_STARTED: list[tuple[TorchServe, bool]] = []


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """Start a real TorchServe on free loopback ports. It is stopped when the test module that started it ends
    (the suite's servers together would not fit the machine's memory), or at the end of the session with
    `session=True`; whatever is left is stopped at the end, and none may outlive the tests.

    Each gets its own empty `auto` choice cache (`server.env[CACHE_ENV]`), so its first worker measures the
    candidates for real instead of reusing a choice another server (or an earlier run) recorded."""

    def start(models: Sequence[str], *, store: Path = STORE, config: Path = DEV_CONFIG,
              overrides: dict[str, str] | None = None, snapshots: bool = False,
              run_dir: Path | None = None, wait: bool = True, cache_dir: Path | None = None,
              session: bool = False) -> TorchServe:
        cache = cache_dir or tmp_path_factory.mktemp("choice_cache")
        server = TorchServe(config=config, run_dir=run_dir or tmp_path_factory.mktemp("torchserve"),
                            model_store=store, models=model_args(models),
                            overrides={**free_port_overrides(), **(overrides or {})}, snapshots=snapshots,
                            env={CACHE_ENV: str(cache)})
        _STARTED.append((server, session))
        server.start()
        if wait:
            server.wait_ready(list(models), timeout=240)
        return server

    yield start
    for server, _ in _STARTED:
        server.stop()
    leaked = [str(server.run_dir) for server, _ in _STARTED if server.alive()]
    assert not leaked, f"TorchServe processes outlived the tests: {leaked}"


@pytest.fixture(scope="module", autouse=True)
def servers_stop_with_their_module() -> Iterator[None]:
    """Stop the servers a module started once its last test (and fixture) is done, unless they serve the session."""
    first = len(_STARTED)
    yield
    for server, session in _STARTED[first:]:
        if not session:
            server.stop()


@pytest.fixture(scope="session")
def digits_server(start_server: StartServer, session_choice_cache: Path) -> TorchServe:
    """digits for the whole session, sharing the in-process handlers' choice cache: tests compare its answers with
    references the archive's handler computes in-process (loadtest.inprocess), which must run the same variant."""
    built_archive("digits")
    return start_server(["digits"], session=True, cache_dir=session_choice_cache)


def tsforge(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m tsforge ARGS` from the project root; an AssertionError with its stderr when it fails."""
    result = subprocess.run([sys.executable, "-m", "tsforge", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"tsforge {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result
