"""A process group whose only member is a zombie has stopped (what made `make stop` wait 35 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tsforge.serving import procgroup


def test_a_zombie_is_not_alive_though_killpg_still_finds_it() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while procgroup.pid_alive(child.pid):  # exits, and stays a zombie: nobody has reaped it yet
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.02)
        os.killpg(child.pid, 0)  # the kernel still counts the zombie in its group
        assert not procgroup.alive(child.pid) and procgroup.members(child.pid) == []
    finally:
        child.wait(timeout=30)
    assert not procgroup.signal_group(child.pid, 0)


def test_a_live_group_lists_its_members_and_no_frontend() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert procgroup.alive(child.pid) and procgroup.members(child.pid) == [child.pid]
        assert procgroup.frontends(child.pid) == []
    finally:
        child.kill()
        child.wait(timeout=30)


def test_free_ports_are_distinct() -> None:
    from tsforge.serving.server import free_port_overrides, free_ports

    assert len(set(free_ports(50))) == 50
    assert len(set(free_port_overrides().values())) == len(free_port_overrides())


def test_wait_returns_when_the_group_is_gone_or_done_says_so() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert not procgroup.wait(child.pid, 0.2)  # still running when the time is up
        assert not procgroup.wait(child.pid, 30, done=lambda: True)  # done() ends the wait at once
        assert procgroup.signal_group(child.pid, 9)
        assert procgroup.wait(child.pid, 30)  # reaps its own child: gone
    finally:
        child.kill()
        child.wait(timeout=30)
