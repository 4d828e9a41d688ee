"""Start, wait for and stop a TorchServe instance, from the Makefile and from tests alike.

    python -m tsforge.serving.server start [--config config/config.properties] [--models digits] [--run-dir build/serve]
    python -m tsforge.serving.server stop  [--run-dir build/serve]

Each instance gets its own run folder (logs, pid file) and its own temp dir, so several can run side by
side: TorchServe keeps its pid file in the temp dir, and its frontend and workers talk over Unix sockets
named `<temp dir>/.ts.sock.<port>` with ports from 9000 in every instance. The temp dir is a short private
one made with `tempfile` (recorded in `<run_dir>/tmpdir`, removed by `stop`): a socket path must fit in
107 bytes, whatever the path of the checkout or run folder. With token
authorization on, TorchServe writes `key_file.json` (management, inference and token-API keys) into the
run folder; `TorchServe.attach(run_dir)` lets any client find the addresses and keys of a running instance.

With `snapshots=True` TorchServe records the registered versions and defaults after every management
change in `<run_dir>/logs/config/*.cfg`. TorchServe itself restores them only when started without a
config file; here the latest snapshot's `model_snapshot` entry is carried into the rendered profile
instead, so a restart keeps the profile's settings and brings back the same versions and defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import requests

from tsforge.project import ROOT
from tsforge.serving import frontproc, gpus, jobqueue, procgroup

PORT_KEYS = {
    "inference_address": "http://127.0.0.1:{}",
    "management_address": "http://127.0.0.1:{}",
    "metrics_address": "http://127.0.0.1:{}",
    "grpc_inference_port": "{}",
    "grpc_management_port": "{}",
    "front_http_port": "{}",
    "front_grpc_port": "{}",
}

PATH_KEYS = ("metrics_config", "model_store", "certificate_file", "private_key_file")
LOG_CONFIG = ROOT / "config" / "log4j2.xml"
KEY_FILE = "key_file.json"
SNAPSHOT_KEY = "model_snapshot"
TEMP_RECORD = "tmpdir"  # names the instance's temp dir, for stop() to remove
TEMP_PREFIX = "tsforge-ts-"
# The frontend names each worker's socket <java.io.tmpdir>/.ts.sock.<port> (java.io.tmpdir comes from TEMP);
# the kernel's sun_path holds 108 bytes with the terminating NUL.
LONGEST_SOCKET = ".ts.sock.65535"
SUN_PATH_MAX = 107
#: lines by which TorchServe says a worker failed: the worker's own (model_log.log) and the frontend's (ts_log.log)
WORKER_FAILED = ("Backend worker process died", "Failed to load model")
FRONTEND_FAILED = ("Retry worker:", "Load model failed")
# stop(): how long the frontend gets to shut down by itself, then how long SIGKILL gets to clear the group;
# `make stop` returns within their sum (the bound: 15 s under load).
STOP_GRACE_S = 10.0
KILL_WAIT_S = 3.0
FAILURE_GRACE_S = 2.0  # how long a failure waits for the worker's traceback to reach its (asynchronous) log
KeyKind = Literal["management", "inference"]


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


def read_java_properties(path: Path) -> dict[str, str]:
    """A file written by java.util.Properties.store (TorchServe's snapshots): values are backslash-escaped."""
    escapes = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}

    def unescape(text: str) -> str:
        return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", lambda m: chr(int(m[1][1:], 16)) if len(m[1]) == 5
                      else escapes.get(m[1], m[1]), text)

    props: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.lstrip()
        if not line or line.startswith(("#", "!")):
            continue
        split = re.search(r"(?<!\\)[=:]", line)
        key, value = (line[: split.start()], line[split.end():]) if split else (line, "")
        props[unescape(key.strip())] = unescape(value.lstrip())
    return props


def write_properties(path: Path, props: Mapping[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports: every socket stays bound until all are chosen, since a port
    released at once can be handed out again by the next bind (two TorchServe APIs then collide)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def free_port_overrides() -> dict[str, str]:
    ports = free_ports(len(PORT_KEYS))
    return {key: template.format(port) for (key, template), port in zip(PORT_KEYS.items(), ports, strict=True)}


class LogTail:
    """The complete lines added to a log file since this object was made; a rolled-over (shorter) file is read
    from its start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.is_file() else 0
        self._partial = b""

    def lines(self) -> list[str]:
        try:
            with self.path.open("rb") as log:
                if log.seek(0, os.SEEK_END) < self.offset:
                    self.offset, self._partial = 0, b""
                log.seek(self.offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in complete]


# <timestamp> [LEVEL] <thread> <logger> - <message>; a worker's thread is W-<port>-<model>_<version>[-stdout|-stderr]
LOG_LINE = re.compile(r"^\S+ \[\w+\s*\] (?P<thread>\S+) \S+ - (?P<message>.*)$")
WORKER_THREAD = re.compile(r"^(W-\d+-.+?)(?:-stdout|-stderr)?$")


class StartupWatch:
    """Follows model_log.log and ts_log.log for a worker that failed to start, and names the worker's error."""

    def __init__(self, logs: Path) -> None:
        self.worker_log = LogTail(logs / "model_log.log")
        self.frontend_log = LogTail(logs / "ts_log.log")
        self.output: dict[str, deque[str]] = {}
        self.failed: tuple[str, str] | None = None  # (worker, the line that said it failed)
        self.failed_at = 0.0

    def failure(self) -> str | None:
        """What failed and why, once a worker failed and its traceback had a moment to reach the log."""
        for line in self.worker_log.lines():
            self._seen(line, WORKER_FAILED, keep=True)
        for line in self.frontend_log.lines():
            self._seen(line, FRONTEND_FAILED, keep=False)
        if self.failed is None:
            return None
        worker, said = self.failed
        error = first_exception(self.output.get(worker, ()))
        if error is None and time.monotonic() - self.failed_at < FAILURE_GRACE_S:
            return None
        if error is None:
            error = " | ".join(list(self.output.get(worker, ()))[-5:]) or said
        return f"worker {worker} failed to start: {error}"

    def _seen(self, line: str, markers: Sequence[str], *, keep: bool) -> None:
        match = LOG_LINE.match(line)
        if not match:
            return
        thread = WORKER_THREAD.match(match["thread"])
        worker = thread[1] if thread else match["thread"]
        if keep:
            self.output.setdefault(worker, deque(maxlen=500)).append(match["message"])
        if self.failed is None and any(marker in match["message"] for marker in markers):
            self.failed, self.failed_at = (worker, match["message"]), time.monotonic()


def first_exception(lines: Sequence[str]) -> str | None:
    """The last line of the first traceback: the worker's own error. (A worker that fails to load then dies
    with a second traceback that only says so: `RuntimeError: 500 - Unknown exception`.)"""
    in_traceback = False
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            return line
    return None


@dataclass
class TorchServe:
    """One TorchServe process tree. `start()` returns at once; `wait_ready()` blocks until served."""

    config: Path = ROOT / "config" / "config.properties"
    run_dir: Path = ROOT / "build" / "serve"
    model_store: Path = ROOT / "model_store"
    models: Sequence[str] = ()
    overrides: Mapping[str, str] = field(default_factory=dict)
    snapshots: bool = False
    log_config: Path | None = LOG_CONFIG
    env: Mapping[str, str] = field(default_factory=dict)  # added to the process environment (e.g. TSFORGE_CACHE_DIR)

    def __post_init__(self) -> None:
        # TorchServe runs inside run_dir, so every path handed to it must be absolute.
        self.run_dir = self.run_dir.resolve()
        self._process: subprocess.Popen[bytes] | None = None
        self._watch: StartupWatch | None = None
        self._scaling: dict[str, int] = {}  # model -> workers still to ask for (workers per GPU x GPUs)
        props = read_properties(self.config)
        # Relative paths in a profile are relative to the project root; TorchServe runs in run_dir.
        for key in PATH_KEYS:
            if key in props and not Path(props[key]).is_absolute():
                props[key] = str(ROOT / props[key])
        props["model_store"] = str(self.model_store.resolve())
        props.setdefault("job_queue_size", str(jobqueue.JOB_QUEUE_SIZE))  # the profiles leave it to jobqueue.py
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

    @classmethod
    def attach(cls, run_dir: Path) -> TorchServe:
        """The instance that `start()` launched from `run_dir`: its rendered config holds the real addresses."""
        rendered = run_dir / "config.properties"
        if not rendered.is_file():
            raise ServerError(f"no TorchServe was started from {run_dir} (no config.properties there)")
        props = read_properties(rendered)
        return cls(config=rendered, run_dir=run_dir, model_store=Path(props["model_store"]))

    def key(self, kind: KeyKind) -> str | None:
        """The management or inference key from key_file.json; None when token authorization is off.

        An expired key (token_expiration_min, 60 by default) is renewed through the token API with the API key.
        """
        key_file = self.run_dir / KEY_FILE
        if not key_file.is_file():
            return None
        entry = json.loads(key_file.read_text())[kind]
        if _expired(entry.get("expiration time")):
            api_key = json.loads(key_file.read_text())["API"]["key"]
            requests.get(f"{self.url('management')}/token", params={"type": kind},
                         headers={"Authorization": f"Bearer {api_key}"}, timeout=10).raise_for_status()
            entry = json.loads(key_file.read_text())[kind]
        return str(entry["key"])

    def auth(self, kind: KeyKind) -> dict[str, str]:
        """HTTP headers that authorize a call to the management or inference API."""
        key = self.key(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def latest_snapshot(self) -> Path | None:
        snapshots = sorted((self.run_dir / "logs" / "config").glob("*.cfg"))  # named yyyyMMddHHmmssSSS-kind.cfg
        return snapshots[-1] if snapshots else None

    def start(self) -> None:
        if self.running():
            raise ServerError(f"TorchServe already runs from {self.run_dir} (pid {self.pid_file.read_text().strip()})")
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        if not self.alive():
            self._remove_temp_dir()  # left by an instance that did not stop cleanly
        (self.run_dir / KEY_FILE).unlink(missing_ok=True)  # a stale key must not be read while the new one is made
        props = {k: v for k, v in self.props.items() if k not in frontproc.FRONT_KEYS}  # tsforge's, not TorchServe's
        snapshot = self.latest_snapshot() if self.snapshots else None
        state = read_java_properties(snapshot).get(SNAPSHOT_KEY) if snapshot else None
        if state:
            props[SNAPSHOT_KEY] = json.dumps(json.loads(state), separators=(",", ":"))
        # Workers per GPU (tsforge/serving/gpus.py): TorchServe's device count and the worker counts from the GPUs
        # seen here, for the models started with --models or else registered by the profile's model_snapshot (the
        # KServe pod's); a restored snapshot keeps the worker counts it recorded.
        devices = gpus.visible_gpus(props.get(gpus.GPU_COUNT_KEY))
        props[gpus.GPU_COUNT_KEY] = str(devices)
        started = self.models or gpus.snapshot_models(props.get(SNAPSHOT_KEY))
        self._scaling = {} if state else gpus.worker_plan(Path(self.props["model_store"]), started, devices)
        rendered = self.run_dir / "config.properties"
        write_properties(rendered, props)
        command = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground",
                   "--ts-config", str(rendered), "--model-store", self.props["model_store"]]
        if not Path(command[0]).is_file():
            command[:1] = [sys.executable, "-c", "from ts.model_server import start; start()"]
        if self.log_config is not None and self.log_config.is_file():
            command += ["--log-config", str(self.log_config)]
        if self.models and not state:
            command += ["--models", *self.models]
        if not self.snapshots:
            command.append("--ncs")
        temp = self._make_temp_dir()
        env = {
            **os.environ,
            "TMPDIR": str(temp),
            "TEMP": str(temp),  # TorchServe passes it on as java.io.tmpdir: the frontend's side of the sockets
            "LOG_LOCATION": str(self.run_dir / "logs"),
            "METRICS_LOCATION": str(self.run_dir / "logs"),
            **self.env,
        }
        self._watch = StartupWatch(self.run_dir / "logs")
        try:
            with self.console_log.open("ab") as console:
                process = subprocess.Popen(command, cwd=self.run_dir, env=env, stdout=console,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
        except OSError:
            self._remove_temp_dir()
            raise
        self.pid_file.write_text(f"{process.pid}\n")
        self._process = process

    @property
    def temp_dir(self) -> Path | None:
        """This instance's temp dir (sockets, TorchServe's pid file, unpacked archives), as recorded at start."""
        try:
            return Path((self.run_dir / TEMP_RECORD).read_text().strip())
        except FileNotFoundError:
            return None

    def _make_temp_dir(self) -> Path:
        temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))  # mode 0700, unique per instance
        if len(os.fsencode(temp / LONGEST_SOCKET)) > SUN_PATH_MAX:
            shutil.rmtree(temp)
            raise ServerError(f"the temp root {temp.parent} is too long for TorchServe's worker sockets "
                              f"(at most {SUN_PATH_MAX} bytes); point TMPDIR at a shorter directory")
        (self.run_dir / TEMP_RECORD).write_text(f"{temp}\n")
        return temp

    def _remove_temp_dir(self) -> None:
        temp = self.temp_dir
        # The record is a plain file: remove only a directory of ours that start() made.
        if (temp is not None and temp.name.startswith(TEMP_PREFIX) and temp.is_dir() and not temp.is_symlink()
                and temp.stat().st_uid == os.getuid()):
            shutil.rmtree(temp, ignore_errors=True)
        (self.run_dir / TEMP_RECORD).unlink(missing_ok=True)

    def running(self) -> bool:
        if self._process is not None:  # started here: poll, which also reaps it (a zombie still answers kill 0)
            return self._process.poll() is None
        pid = self._pid()
        return pid is not None and procgroup.pid_alive(pid)  # a zombie launcher, not yet reaped, has stopped

    def _pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def wait_ready(self, models: Sequence[str] = (), timeout: float = 180.0) -> None:
        """Poll /ping, then each model's workers, until all are READY; raise ServerError on timeout, or as soon
        as a worker fails to start (TorchServe would retry it until the timeout), with the worker's error."""
        deadline = time.monotonic() + timeout
        pending = ["/ping", *(f"/models/{m}" for m in models)]
        last = "no answer yet"
        watch = self._watch or StartupWatch(self.run_dir / "logs")  # attached: from now on
        while pending:
            if not self.running():
                raise ServerError(f"TorchServe exited during start-up; see {self.console_log} and {self.log_file}")
            failure = watch.failure()
            if failure:
                raise ServerError(f"{failure}; see {self.run_dir / 'logs' / 'model_log.log'}")
            if time.monotonic() > deadline:
                raise ServerError(f"TorchServe not ready after {timeout:.0f}s ({pending[0]}: {last}); "
                                  f"see {self.log_file}")
            self._scaling = {m: n for m, n in self._scaling.items()
                             if not gpus.scale(self.url("management"), self.auth("management"), m, n)}
            ok, last = self._check(pending[0])
            if pending[0].removeprefix("/models/") in self._scaling:  # ready only with all its GPUs' workers
                ok, last = False, f"scaling to {self._scaling[pending[0].removeprefix('/models/')]} workers"
            if ok:
                pending.pop(0)
            else:
                time.sleep(0.25)

    def _check(self, path: str) -> tuple[bool, str]:
        try:
            if path == "/ping":
                r = requests.get(self.url("inference") + "/ping", headers=self.auth("inference"), timeout=2)
                return r.status_code == 200 and r.json().get("status") == "Healthy", r.text[:200]
            r = requests.get(self.url("management") + path, headers=self.auth("management"), timeout=2)
            if r.status_code != 200:
                return False, f"HTTP {r.status_code} {r.text[:200]}"
            counts = [(_ready_workers(e), int(e.get("minWorkers") or 0)) for e in r.json()]
            # Each version's minWorkers, not any one worker: the others may not even be listed yet.
            ok = any(ready for ready, _ in counts) and all(ready >= wanted for ready, wanted in counts)
            return ok, f"READY/minWorkers per version: {counts}"
        except (requests.RequestException, ValueError) as exc:
            return False, str(exc)

    def stop(self, grace: float = STOP_GRACE_S) -> bool:
        """Stop the whole process tree (frontend and workers) within `grace` + KILL_WAIT_S seconds; False if
        nothing was running.

        As `torchserve --stop` does, SIGTERM goes to the Java frontend alone: it closes its ports, answers what
        its workers hold, saves the shutdown snapshot and stops its workers itself (2.5-2.7 s under 16 clients,
        2 s of it Netty's graceful-shutdown quiet period). Signalling the workers too would kill the batches they
        hold, and the frontend would start replacements while it shuts down. Once the frontend has gone, or after
        `grace` seconds, SIGKILL goes to whatever is left of the group: workers it orphaned, or all of it.
        """
        frontproc.stop(self.run_dir)  # the v2 front first: it would only answer 5xx without TorchServe
        # The process this object started, else the one in the pid file (`make stop` from another process).
        # The group is checked, not the launcher alone: TorchServe's frontend and workers may outlive it.
        pid = self._process.pid if self._process is not None else self._pid()
        if pid is None or not self.alive():
            self._forget(pid)
            return False
        frontend = procgroup.frontends(pid)
        for target in frontend:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGTERM)
        if not frontend:  # still starting: no frontend to ask yet
            procgroup.signal_group(pid, signal.SIGTERM)

        def frontend_gone() -> bool:
            return bool(frontend) and not any(procgroup.pid_alive(f) for f in frontend)

        procgroup.wait(pid, grace, frontend_gone)
        if procgroup.signal_group(pid, signal.SIGKILL):
            procgroup.wait(pid, KILL_WAIT_S)
        procgroup.reap(pid)
        self._forget(pid)
        return True

    def alive(self) -> bool:
        """Whether any process of this instance's tree (launcher, frontend, workers) is left."""
        pid = self._process.pid if self._process is not None else self._pid()
        return pid is not None and procgroup.alive(pid)

    def _forget(self, pid: int | None) -> None:
        """Remove the pid file and temp dir if the pid file names `pid`: a later instance here keeps its own."""
        if pid is None or self._pid() == pid:
            self.pid_file.unlink(missing_ok=True)
            self._remove_temp_dir()


def _ready_workers(entry: dict[str, Any]) -> int:
    return sum(w.get("status") == "READY" for w in entry.get("workers", []))


def _expired(stamp: str | None) -> bool:
    if not stamp:
        return False
    # Java's Instant.toString(): ISO 8601 in UTC with up to nine fractional digits
    parsed = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", stamp).replace("Z", "+00:00"))
    return parsed <= datetime.now(timezone.utc)


def model_args(names: Sequence[str]) -> list[str]:
    return [f"{n}={n}.mar" for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.serving.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.properties")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "build" / "serve")
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--models", nargs="*", default=["digits"], help="archives to load (NAME -> NAME.mar)")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--snapshots", action="store_true", help="keep config snapshots (restart restores models)")
    parser.add_argument("--grace", type=float, default=STOP_GRACE_S,
                        help="stop: seconds the frontend gets to shut down before SIGKILL")
    args = parser.parse_args(argv)
    server = TorchServe(config=args.config, run_dir=args.run_dir, model_store=args.model_store,
                        models=model_args(args.models), snapshots=args.snapshots)
    if args.action == "stop":
        print("TorchServe stopped" if server.stop(args.grace) else "TorchServe was not running")
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
    if frontproc.enabled(server.props):
        try:
            front = frontproc.start(server.run_dir, server.props, server.url("inference"), args.models,
                                    server.run_dir / KEY_FILE, timeout=args.timeout)
        except frontproc.FrontError as exc:
            server.stop()
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"Open Inference Protocol (v2): REST {front}, gRPC 127.0.0.1:{server.props['front_grpc_port']}")
    print(f"logs: {server.run_dir / 'logs'}   stop: make stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
