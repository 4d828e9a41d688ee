"""Start, wait for and stop a TorchServe instance, from the Makefile and from tests alike.

    python -m tsforge.server start [--config config/config.properties] [--models digits] [--run-dir build/serve]
    python -m tsforge.server stop  [--run-dir build/serve]

Each instance gets its own run folder (logs, pid file, temp dir), so several can run side by side:
TorchServe keeps its pid file in the temp dir, which is therefore set per instance.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tsforge.project import ROOT

PORT_KEYS = {
    "inference_address": "http://127.0.0.1:{}",
    "management_address": "http://127.0.0.1:{}",
    "metrics_address": "http://127.0.0.1:{}",
    "grpc_inference_port": "{}",
    "grpc_management_port": "{}",
}

PATH_KEYS = ("metrics_config", "model_store", "certificate_file", "private_key_file")


class ServerError(RuntimeError):
    """TorchServe did not start, or did not become ready in time."""


def read_properties(path: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def write_properties(path: Path, props: Mapping[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_overrides() -> dict[str, str]:
    return {key: template.format(free_port()) for key, template in PORT_KEYS.items()}


@dataclass
class TorchServe:
    """One TorchServe process tree. `start()` returns at once; `wait_ready()` blocks until served."""

    config: Path = ROOT / "config" / "config.properties"
    run_dir: Path = ROOT / "build" / "serve"
    model_store: Path = ROOT / "model_store"
    models: Sequence[str] = ()
    overrides: Mapping[str, str] = field(default_factory=dict)
    snapshots: bool = False

    def __post_init__(self) -> None:
        props = read_properties(self.config)
        # Relative paths in a profile are relative to the project root; TorchServe runs in run_dir.
        for key in PATH_KEYS:
            if key in props and not Path(props[key]).is_absolute():
                props[key] = str(ROOT / props[key])
        props["model_store"] = str(self.model_store.resolve())
        props.update(self.overrides)
        self.props = props

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "torchserve.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "logs" / "ts_log.log"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    def url(self, api: str) -> str:
        return self.props[f"{api}_address"].rstrip("/")

    @property
    def token(self) -> str | None:
        """The management token when token authorization is on (TorchServe writes key_file.json)."""
        import json

        key_file = self.run_dir / "key_file.json"
        if not key_file.is_file():
            return None
        keys = json.loads(key_file.read_text())
        return str(keys["management"]["key"])

    def start(self) -> None:
        if self.running():
            raise ServerError(f"TorchServe already runs from {self.run_dir} (pid {self.pid_file.read_text().strip()})")
        for sub in ("logs", "tmp"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        rendered = self.run_dir / "config.properties"
        write_properties(rendered, self.props)
        command = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground",
                   "--ts-config", str(rendered), "--model-store", self.props["model_store"]]
        if not Path(command[0]).is_file():
            command[:1] = [sys.executable, "-c", "from ts.model_server import start; start()"]
        if self.models:
            command += ["--models", *self.models]
        if not self.snapshots:
            command.append("--ncs")
        env = {
            **os.environ,
            "TMPDIR": str(self.run_dir / "tmp"),
            "TEMP": str(self.run_dir / "tmp"),
            "LOG_LOCATION": str(self.run_dir / "logs"),
            "METRICS_LOCATION": str(self.run_dir / "logs"),
        }
        with self.console_log.open("ab") as console:
            process = subprocess.Popen(command, cwd=self.run_dir, env=env, stdout=console,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.pid_file.write_text(f"{process.pid}\n")
        self._process = process

    def running(self) -> bool:
        pid = self._pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def wait_ready(self, models: Sequence[str] = (), timeout: float = 180.0) -> None:
        """Poll /ping, then each model's workers, until all are READY; raise ServerError on timeout."""
        deadline = time.monotonic() + timeout
        pending = ["/ping", *(f"/models/{m}" for m in models)]
        last = "no answer yet"
        while pending:
            if not self.running():
                raise ServerError(f"TorchServe exited during start-up; see {self.console_log} and {self.log_file}")
            if time.monotonic() > deadline:
                raise ServerError(f"TorchServe not ready after {timeout:.0f}s ({pending[0]}: {last}); "
                                  f"see {self.log_file}")
            ok, last = self._check(pending[0])
            if ok:
                pending.pop(0)
            else:
                time.sleep(0.25)

    def _check(self, path: str) -> tuple[bool, str]:
        try:
            if path == "/ping":
                r = requests.get(self.url("inference") + "/ping", timeout=2)
                return r.status_code == 200 and r.json().get("status") == "Healthy", r.text[:200]
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            r = requests.get(self.url("management") + path, headers=headers, timeout=2)
            if r.status_code != 200:
                return False, f"HTTP {r.status_code} {r.text[:200]}"
            workers = [w for entry in r.json() for w in entry.get("workers", [])]
            return any(w.get("status") == "READY" for w in workers), f"workers {workers}"
        except (requests.RequestException, ValueError) as exc:
            return False, str(exc)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the whole process tree (frontend and workers); False if nothing was running."""
        pid = self._pid()
        if pid is None or not self.running():
            self.pid_file.unlink(missing_ok=True)
            return False
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(pid):
                _reap(pid)
                time.sleep(0.1)
            if not _group_alive(pid):
                break
        _reap(pid)
        self.pid_file.unlink(missing_ok=True)
        return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def model_args(names: Sequence[str]) -> list[str]:
    return [f"{n}={n}.mar" for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.properties")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "build" / "serve")
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--models", nargs="*", default=["digits"], help="archives to load (NAME -> NAME.mar)")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--snapshots", action="store_true", help="keep config snapshots (restart restores models)")
    args = parser.parse_args(argv)
    server = TorchServe(config=args.config, run_dir=args.run_dir, model_store=args.model_store,
                        models=model_args(args.models), snapshots=args.snapshots)
    if args.action == "stop":
        print("TorchServe stopped" if server.stop() else "TorchServe was not running")
        return 0
    if args.action == "status":
        print(f"TorchServe {'runs' if server.running() else 'does not run'} ({server.run_dir})")
        return 0 if server.running() else 1
    server.start()
    try:
        server.wait_ready(args.models, timeout=args.timeout)
    except ServerError as exc:
        server.stop()
        print(f"error: {exc}", file=sys.stderr)
        tail = server.log_file.read_text(errors="replace").splitlines()[-20:] if server.log_file.exists() else []
        print("\n".join(tail), file=sys.stderr)
        return 1
    print(f"TorchServe ready: inference {server.url('inference')}, management {server.url('management')}, "
          f"metrics {server.url('metrics')}; models: {', '.join(args.models)}")
    print(f"logs: {server.run_dir / 'logs'}   stop: make stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
