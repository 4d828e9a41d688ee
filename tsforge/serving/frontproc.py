"""The v2 front's process (`tsforge/serving/front.py`) beside a TorchServe instance: started once TorchServe serves,
stopped with it.

A profile turns the front on by naming its two ports (loopback, like every TorchServe port):

    front_http_port=8085    Open Inference Protocol over REST (/v2/health/ready, /v2/models/M, .../infer)
    front_grpc_port=8086    inference.GRPCInferenceService

The front needs the `front` extra (kserve). Without it, serving goes on without the front and says so in one
line naming the extra, unless the profile requires the front:

    front_required=true     no serving without the front: a missing `front` extra fails `serve` (one line)
    front_max_form_fields=1000   form bodies with more fields are refused (413) before TorchServe decodes them

These keys are tsforge's, not TorchServe's: they are left out of the properties TorchServe is given. The front
runs in its own session (it cannot join TorchServe's process group, which has a session of its own), and its
pid file in the run dir lets `make stop` find it from any process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import requests

from tsforge import extras
from tsforge.project import ROOT
from tsforge.serving import jobqueue, procgroup

PORT_KEYS = ("front_http_port", "front_grpc_port")
REQUIRED_KEY = "front_required"
FORM_FIELDS_KEY = "front_max_form_fields"
FRONT_KEYS = (*PORT_KEYS, REQUIRED_KEY, FORM_FIELDS_KEY)  # tsforge's keys, not TorchServe's
#: what the front imports from the `front` extra (tsforge/serving/front.py, tsforge/serving/front_rest.py)
PACKAGES = ("kserve", "aiohttp", "starlette")
PURPOSE = "the v2 front (front_http_port, front_grpc_port)"
PID_FILE = "front.pid"
LOG_FILE = "front.log"


class FrontError(RuntimeError):
    """The front exited or did not answer in time; the message carries the end of its log."""


def enabled(props: Mapping[str, str]) -> bool:
    """Whether `serve` starts the front: the profile names its ports, and the `front` extra is installed or the
    profile requires the front (then `start` fails, in one line naming the extra). A profile that names the ports
    without the extra installed gets one warning line on stderr, and serving goes on without the front."""
    if not all(props.get(key) for key in PORT_KEYS):
        return False
    absent = missing()
    if absent is None or required(props):
        return True
    print(f"warning: serving without the v2 front: {absent}", file=sys.stderr)
    return False


def required(props: Mapping[str, str]) -> bool:
    return props.get(REQUIRED_KEY, "false").strip().lower() == "true"


def missing() -> str | None:
    """The one line naming the `front` extra when one of its packages is missing; None when all are there."""
    absent = next((name for name in PACKAGES if not extras.available(name)), None)
    return None if absent is None else extras.message(PURPOSE, absent, "front")


def url(props: Mapping[str, str]) -> str:
    return f"http://127.0.0.1:{props['front_http_port']}"


def start(run_dir: Path, props: Mapping[str, str], inference_url: str, models: Sequence[str],
          key_file: Path | None, timeout: float = 60.0, *, host: str | None = None,
          metrics_url: str | None = None) -> str:
    """Start the front for `models` (archive names in the store) and wait until it answers; its REST URL.
    FrontError, naming the `front` extra, when that is not installed. `host` puts its ports on another address
    than loopback (`tsforge pod`); `metrics_url` lets it answer GET /metrics with TorchServe's."""
    absent = missing()
    if absent is not None:
        raise FrontError(absent)
    log = run_dir / "logs" / LOG_FILE
    command = [sys.executable, "-m", "tsforge.serving.front", "--inference-url", inference_url,
               "--model-store", props["model_store"], "--models", ",".join(models),
               "--http-port", props["front_http_port"], "--grpc-port", props["front_grpc_port"]]
    if key_file is not None and key_file.is_file():
        command += ["--key-file", str(key_file)]
    if props.get("max_request_size"):
        command += ["--max-request-size", props["max_request_size"]]
    if props.get(FORM_FIELDS_KEY):
        command += ["--max-form-fields", props[FORM_FIELDS_KEY]]
    if host:
        command += ["--host", host]
    if metrics_url:
        command += ["--metrics-url", metrics_url]
    with log.open("ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   env={**os.environ, jobqueue.SIZE_ENV: str(jobqueue.queue_size(dict(props)))})
    (run_dir / PID_FILE).write_text(f"{process.pid}\n")
    base = url(props)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FrontError(f"the v2 front exited ({process.returncode}): {_tail(log)}")
        try:
            if requests.get(f"{base}/v2/health/live", timeout=2).status_code == 200:
                return base
        except requests.RequestException:
            pass
        time.sleep(0.2)
    stop(run_dir)
    raise FrontError(f"the v2 front did not answer within {timeout:.0f} s: {_tail(log)}")


def stop(run_dir: Path, wait: float = 5.0) -> bool:
    """Stop the front recorded in `run_dir` (SIGTERM, then SIGKILL); False if none ran."""
    pid_file = run_dir / PID_FILE
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False
    pid_file.unlink(missing_ok=True)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not procgroup.signal_group(pid, sig) or procgroup.wait(pid, wait):
            break
    return True


def _tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(errors="replace").splitlines()[-lines:] if log.is_file() else []
    return "\n".join(text)
