"""The processes of one TorchServe instance: a process group (launcher, Java frontend, Python workers).

A zombie is not counted as alive. It has exited and holds nothing, but it stays in its group until its parent
reaps it; when `make stop` runs in another process than the one that started TorchServe (a test, a supervisor),
that parent may not reap the launcher for a long time, and `killpg(pgid, 0)`, which counts zombies, kept `stop`
waiting out both of its windows (35 s). Linux's /proc says which members are zombies; elsewhere `killpg` decides.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

PROC = Path("/proc")
FRONTEND_CLASS = "org.pytorch.serve.ModelServer"  # the Java frontend's main class, on its command line


def _stat(pid: str) -> tuple[str, int] | None:
    """(state, process group) of a process from /proc/PID/stat; None if it is gone."""
    try:
        raw = (PROC / pid / "stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
    return fields[0].decode(), int(fields[2])


def members(pgid: int) -> list[int] | None:
    """The live (not zombie) processes of group `pgid`; None where /proc cannot tell (not Linux)."""
    if not (PROC / "self" / "stat").is_file():
        return None
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(entry.name)
            if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is alive (zombies excepted where /proc tells them apart)."""
    live = members(pgid)
    if live is not None:
        return bool(live)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not, where /proc tells them apart)."""
    if (PROC / "self" / "stat").is_file():
        stat = _stat(str(pid))
        return stat is not None and stat[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def frontends(pgid: int) -> list[int]:
    """The group's Java frontend (TorchServe's ModelServer), if it is running yet."""
    found = []
    for pid in members(pgid) or []:
        with contextlib.suppress(OSError):
            if FRONTEND_CLASS.encode() in (PROC / str(pid) / "cmdline").read_bytes().split(b"\0"):
                found.append(pid)
    return found


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to every process of the group; False if none was left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def reap(pid: int) -> None:
    """Collect `pid`'s exit status if it is a child of this process that has exited."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def wait(pgid: int, seconds: float, done: Callable[[], bool] = lambda: False) -> bool:
    """Until the group is empty, `done()` holds, or `seconds` have passed, reaping the group's leader meanwhile
    (a child of this process); whether the group is empty."""
    deadline = time.monotonic() + seconds
    while True:
        reap(pgid)
        if not alive(pgid):
            return True
        if done() or time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
