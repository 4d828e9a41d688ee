"""Keeps the two tiers honest: a test without the `integration` mark may start no TorchServe, no Java and no server.

`make test-fast` runs `pytest -m "not integration"` and must stay a few minutes long; one unmarked test that starts
a server would quietly make it half an hour again. Two checks, both active only while an unmarked test runs (its
fixtures' setup included, so a session-wide server first started for a unit test counts against that test):

- in this process, an audit hook sees every process started (subprocess, os.exec*, os.posix_spawn) and refuses
  the commands that start a server: `torchserve`, `java`, the v2 front, the pod, uvicorn, the Flask baseline,
  `tsforge serve|pod|front|bench|loadtest|...` and the Makefile targets that serve;
- in every process below it (`make` -> `python -m loadtest.bench` -> TorchServe), `java` resolves to a stand-in
  (JAVA_HOME and PATH) that records its command line and exits 3, so TorchServe cannot start there either.

Either way the test fails, naming what it started.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

#: command-line words that start a server, wherever they appear in a command
SERVER_WORDS = re.compile(r"(^|/)(torchserve|java|uvicorn)$|^tsforge\.serving\.(front|pod|server)$"
                          r"|^loadtest\.(flask_baseline|bench|soak|serving|startup|front_cost|form_flood|tune)$")
#: `tsforge COMMAND` and `make TARGET` that start one
SERVING_COMMANDS = {"serve", "pod", "front", "bench", "bench-front", "bench-startup", "bench-gpu", "loadtest",
                    "tune", "soak", "deploy", "rollback", "reliability-data", "form-flood", "test", "test-isa"}

_active: str | None = None  # the node id of the unmarked test now running
_refused: list[str] = []


def starts_a_server(argv: Sequence[str]) -> bool:
    words = [str(word) for word in argv]
    if {"-n", "--dry-run", "--just-print", "-h", "--help"} & set(words):
        return False  # prints what it would do
    if any(SERVER_WORDS.search(word) for word in words):
        return True
    names = [Path(word).name for word in words]
    for index, name in enumerate(names[:-1]):
        if name in {"tsforge", "make"} or (name == "-m" and names[index + 1] == "tsforge"):
            rest = [w for w in names[index + 1:] if not w.startswith("-") and "=" not in w and w != "tsforge"]
            return bool(rest) and rest[0] in SERVING_COMMANDS
    return False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _active is None or event not in {"subprocess.Popen", "os.posix_spawn", "os.exec"}:
        return
    argv = args[1]  # Popen: (executable, args, cwd, env); exec and posix_spawn: (path, args, env)
    argv = [argv] if isinstance(argv, (str, bytes, os.PathLike)) else list(argv or [])
    argv = [os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in argv]
    if len(argv) == 1 and " " in argv[0]:
        argv = shlex.split(argv[0])
    if starts_a_server(argv):
        _refused.append(shlex.join(argv))
        raise RuntimeError(f"a test without the integration mark started a server: {shlex.join(argv)}")


sys.addaudithook(_audit)


def java_stand_in(folder: Path) -> Path:
    """A JAVA_HOME whose `java` records its command line in folder/started and exits 3."""
    java = folder / "bin" / "java"
    java.parent.mkdir(parents=True, exist_ok=True)
    record = folder / "started"
    java.write_text(f'#!/bin/sh\necho "java $*" >> "{record}"\n'
                    'echo "unit tier: java started by a test without the integration mark" >&2\nexit 3\n')
    java.chmod(java.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


_saved_env: dict[str, str | None] = {}
_STARTED = pytest.StashKey[Path]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    _enter(item)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield
    _leave()


def _enter(item: pytest.Item) -> None:
    global _active
    if item.get_closest_marker("integration") is not None:
        return
    home: Path = item.config.stash[_JAVA_HOME]
    _refused.clear()  # what an earlier test's failed setup refused was reported there
    _saved_env.update({key: os.environ.get(key) for key in ("JAVA_HOME", "PATH")})
    os.environ["JAVA_HOME"] = str(home)
    os.environ["PATH"] = f"{home / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    item.stash[_STARTED] = home / "started"
    _active = item.nodeid


def saved_environment() -> dict[str, str | None]:
    """JAVA_HOME and PATH as they were before the running unit test's stand-in replaced them."""
    return dict(_saved_env)


def _leave() -> None:
    global _active
    _active = None
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()


@pytest.fixture(autouse=True)
def unit_tests_start_no_server(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails an unmarked test that started a server (in this process or any below it)."""
    yield
    record = request.node.stash.get(_STARTED, None)
    started = list(_refused)
    _refused.clear()
    if record is not None and record.exists():
        started += record.read_text().splitlines()
        record.unlink()
    if started:
        pytest.fail(f"{request.node.nodeid} has no integration mark but started a server: {started[0]} "
                    "(mark it @pytest.mark.integration, or test the code without a server)", pytrace=False)


_JAVA_HOME = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    import tempfile

    config.stash[_JAVA_HOME] = java_stand_in(Path(tempfile.mkdtemp(prefix="tsforge-unit-tier-")))


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    shutil.rmtree(config.stash[_JAVA_HOME], ignore_errors=True)
