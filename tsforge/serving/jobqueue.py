"""TorchServe's job queue, readable: how full it is, and a 503 that says the queue was full.

Each model version has one queue of requests waiting for a worker, `job_queue_size` long: JOB_QUEUE_SIZE below,
which tsforge.serving.server renders into the properties TorchServe is given (a profile that sets `job_queue_size`
overrides it; an archive's `jobQueueSize` replaces it for that model) and tsforge.kube.kserve writes into the
bundle. A request that finds it full is refused at once with 503 and "Model "M" has no worker to serve inference
request. Please use scale workers API to add workers...", which sends the reader after workers when the queue is the
cause (issue 19 measured exactly that at concurrency 512). The Java frontend's words cannot be changed here, so
tsforge says it where it can:

- the v2 front answers such a 503 with `queue_full_message(...)` on every path: REST JSON and /predictions
  (tsforge/serving/front_rest.py), REST's binary extension and gRPC (tsforge/serving/front.py, as UNAVAILABLE);
- `tsforge metrics` prints each version's queue (waiting, free) from the management API's `jobQueueStatus`;
- TorchServe counts the refusals in `Requests5XX`, and `ts_queue_latency_microseconds` shows how long the
  accepted ones waited.
"""

from __future__ import annotations

import json
import os
from typing import Any

import requests

#: what TorchServe 0.12 says when a request finds the job queue full (ApiUtils.addRESTInferenceJob)
TORCHSERVE_WORDS = "has no worker to serve inference request"
#: requests that may wait for a worker, per model version: the one place the size is written. A closed-loop client
#: holds at most one request in the queue, so at concurrency C at most C wait: this is the 1,024 concurrent requests
#: that must never get a 503 (issue 19), twice over for requests whose client gave up but which stay queued until a
#: worker takes them. It is a bound, not an allocation: a full queue costs memory (each waiting request keeps its
#: body) and latency (the last waits for every request before it: the queue over the model's throughput, measured
#: in docs/benchmarks.md and docs/data/bench-*.json).
JOB_QUEUE_SIZE = 2048
#: the profile's job_queue_size, handed to the v2 front's process by tsforge.serving.frontproc
SIZE_ENV = "TSFORGE_JOB_QUEUE_SIZE"


def queue_size(props: dict[str, str] | None = None) -> int:
    """The job_queue_size TorchServe was given (from `props`, else the environment the front was given), JOB_QUEUE_SIZE
    where neither says."""
    value = (props or {}).get("job_queue_size") or os.environ.get(SIZE_ENV, "")
    return int(value) if value.strip().isdigit() else JOB_QUEUE_SIZE


def is_queue_full(status: int, message: str | None) -> bool:
    return status == 503 and message is not None and TORCHSERVE_WORDS in message


def queue_full_message(model: str, size: int) -> str:
    return (f"model {model}: the job queue is full ({size} requests already wait for a worker: job_queue_size, "
            f"or the archive's jobQueueSize); retry later, or raise job_queue_size or add workers")


def queues(management_url: str, headers: dict[str, str]) -> dict[str, dict[str, dict[str, int]]]:
    """model -> version -> {"waiting", "free"}: the management API's jobQueueStatus of every registered version."""
    found: dict[str, dict[str, dict[str, int]]] = {}
    listed = requests.get(f"{management_url}/models", headers=headers, timeout=10).json().get("models", [])
    for entry in listed:
        name = entry["modelName"]
        described: list[dict[str, Any]] = requests.get(f"{management_url}/models/{name}/all", headers=headers,
                                                       timeout=10).json()
        for version in described:
            status = version.get("jobQueueStatus") or {}
            found.setdefault(name, {})[str(version["modelVersion"])] = {
                "waiting": int(status.get("pendingRequests", 0)), "free": int(status.get("remainingCapacity", 0))}
    return found


def queue_lines(management_url: str, headers: dict[str, str]) -> list[str]:
    """`tsforge metrics`' lines: each version's queue, FULL when nothing is free (new requests get 503)."""
    lines = ["job queues (waiting / capacity; FULL: new requests are answered 503):"]
    for model, versions in sorted(queues(management_url, headers).items()):
        for version, q in sorted(versions.items()):
            full = "  FULL" if q["free"] == 0 else ""
            lines.append(f"  {model} {version}: {q['waiting']} / {q['waiting'] + q['free']}{full}")
    return lines


def model_of(path: str) -> str:
    """The model a REST inference path names: /v2/models/M[/versions/V]/infer, /v1/models/M:predict,
    /predictions/M[/V]."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] in ("predictions", "models"):
        return parts[1]
    if len(parts) >= 3 and parts[1] == "models":
        return parts[2].split(":", 1)[0]
    return path


def queue_full_body(path: str, v2: bool) -> bytes:
    """The answer for a queue-full 503: KServe's `{"error"}` for v2, TorchServe's `{"code", "type", "message"}`
    otherwise."""
    message = queue_full_message(model_of(path), queue_size())
    body = {"error": message} if v2 else {"code": 503, "type": "ServiceUnavailableException", "message": message}
    return json.dumps(body).encode()
