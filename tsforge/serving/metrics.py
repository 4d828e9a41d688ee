"""Health, readiness and the important Prometheus metrics of a running TorchServe: `make metrics`.

    python -m tsforge.serving.metrics [--run-dir build/serve] [--all]

Health is /ping (inference key under token authorization); readiness is per model version: READY
workers out of all, from the management API (management key). Metrics come from the metrics API's
Prometheus endpoint, parsed with prometheus_client: TorchServe's request counters and latencies and the
handlers' own metrics (handlers/telemetry.py, declared in config/metrics.yaml).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from tsforge.project import ROOT
from tsforge.serving import jobqueue
from tsforge.serving.server import TorchServe

#: shown by default, in this order; --all shows every family
IMPORTANT = (
    "ts_inference_requests", "ts_inference_latency_microseconds", "ts_queue_latency_microseconds",
    "Requests2XX", "Requests4XX", "Requests5XX", "QueueTime", "WorkerThreadTime",
    "HandlerBatchSize", "HandlerDecodeTime", "HandlerInferenceTime", "HandlerEncodeTime", "HandlerRequestErrors",
    "HandlerTime", "PredictionTime", "CPUUtilization", "MemoryUsed", "MemoryUtilization",
)
HIDDEN_LABELS = ("Hostname", "hostname", "Level")


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float

    def line(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(self.labels.items()) if k not in HIDDEN_LABELS)
        return f"  {self.name}{'{' + shown + '}' if shown else ''} {self.value:g}"


def scrape(server: TorchServe) -> dict[str, list[Sample]]:
    """Every metric family on the Prometheus endpoint, keyed by family name."""
    response = requests.get(server.url("metrics") + "/metrics", timeout=10)
    response.raise_for_status()
    families: dict[str, list[Sample]] = defaultdict(list)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            families[family.name].append(Sample(sample.name, dict(sample.labels), float(sample.value)))
    return dict(families)


def health(server: TorchServe) -> str:
    try:
        response = requests.get(server.url("inference") + "/ping", headers=server.auth("inference"), timeout=5)
        return str(response.json().get("status", response.status_code))
    except (requests.RequestException, ValueError) as exc:
        return f"unreachable ({exc.__class__.__name__})"


def readiness(server: TorchServe) -> dict[str, dict[str, tuple[int, int, bool]]]:
    """model -> version -> (READY workers, all workers, is default)."""
    headers = server.auth("management")
    base = server.url("management")
    listed = requests.get(base + "/models", headers=headers, timeout=10).json().get("models", [])
    ready: dict[str, dict[str, tuple[int, int, bool]]] = {}
    for entry in listed:
        name = entry["modelName"]
        default = requests.get(f"{base}/models/{name}", headers=headers, timeout=10).json()[0]["modelVersion"]
        for described in requests.get(f"{base}/models/{name}/all", headers=headers, timeout=10).json():
            workers = described.get("workers", [])
            up = sum(w.get("status") == "READY" for w in workers)
            version = described["modelVersion"]
            ready.setdefault(name, {})[version] = (up, len(workers), version == default)
    return ready


def report(server: TorchServe, show_all: bool = False) -> str:
    lines = [f"health: {health(server)}", "readiness (READY/all workers, * = default):"]
    for model, versions in sorted(readiness(server).items()):
        for version, (up, total, default) in sorted(versions.items()):
            lines.append(f"  {'*' if default else ' '} {model} {version}: {up}/{total}")
    lines += jobqueue.queue_lines(server.url("management"), server.auth("management"))
    families = scrape(server)
    names = sorted(families) if show_all else [n for n in IMPORTANT if n in families]
    lines.append(f"metrics ({server.url('metrics')}/metrics):")
    for name in names:
        lines.extend(s.line() for s in families[name])
    missing = [n for n in IMPORTANT if n not in families and n.startswith("Handler")]
    if missing and not show_all:
        lines.append(f"  (not reported yet, no batch since start: {', '.join(missing)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.serving.metrics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "build" / "serve")
    parser.add_argument("--all", action="store_true", help="every metric family, not only the important ones")
    args = parser.parse_args(argv)
    try:
        print(report(TorchServe.attach(args.run_dir), args.all))
    except (requests.RequestException, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
