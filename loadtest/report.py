"""The summary JSON every load run writes (locust or loadgen alike), its plot, and the machine it ran on.

Summary fields: tool, model, protocol, users, target, duration_s, requests, failures, success_rate,
qps, latency_ms {mean, p50, p95, p99, max}, failure_reasons, server {cpu_percent, cores, frontend
{cpu_percent, peak_rss_mb}, workers {cpu_percent, peak_rss_mb, count}}, torchserve (its own metrics),
machine, created.
"""

from __future__ import annotations

import csv
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from loadtest.loadgen import LoadResult

SUMMARY = "summary.json"
PLOT = "summary.png"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def shown(path: Path) -> str:
    """A path as reports show it: relative to the project when inside it (no machine paths in docs)."""
    from tsforge.project import ROOT

    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def server_pid(run_dir: Path) -> int | None:
    """The TorchServe started from run_dir (tsforge.server writes its pid file there)."""
    try:
        return int((run_dir / "torchserve.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def machine() -> dict[str, Any]:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    with_model = Path("/proc/cpuinfo")
    if with_model.is_file():
        for line in with_model.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        from importlib.metadata import version

        torchserve = version("torchserve")
    except Exception:
        torchserve = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchserve": torchserve,
        "os": f"{platform.system()} {platform.release()}",
    }


def latency_stats(latency_ms: list[float]) -> dict[str, float]:
    if not latency_ms:
        return {"mean": float("nan"), "p50": float("nan"), "p95": float("nan"), "p99": float("nan"),
                "max": float("nan")}
    values = np.asarray(latency_ms)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"mean": round(float(values.mean()), 2), "p50": round(float(p50), 2), "p95": round(float(p95), 2),
            "p99": round(float(p99), 2), "max": round(float(values.max()), 2)}


def summarize(result: LoadResult, *, tool: str, model: str, protocol: str, users: int, target: str,
              server: dict[str, Any] | None = None, torchserve: dict[str, Any] | None = None,
              **extra: Any) -> dict[str, Any]:
    requests_done = len(result.latency_ms)
    ok = requests_done - result.failed
    return {
        "tool": tool, "model": model, "protocol": protocol, "users": users, "target": target,
        "duration_s": round(result.elapsed_s, 2),
        "requests": requests_done,
        "failures": result.failed,
        "success_rate": round(ok / requests_done, 4) if requests_done else 0.0,
        # Throughput counts correct answers only: a fast wrong answer is worth nothing.
        "qps": round(ok / result.elapsed_s, 2) if result.elapsed_s > 0 else 0.0,
        "latency_ms": latency_stats(result.latency_ms),
        "failure_reasons": dict(sorted(result.failures.items(), key=lambda kv: -kv[1])),
        "server": server or {},
        "torchserve": torchserve or {},
        **extra,
        "machine": machine(),
        "created": now(),
    }


def timeline(result: LoadResult) -> list[dict[str, float]]:
    """Per-second buckets: requests/s, failures/s, P50 and P99 latency."""
    if not result.started:
        return []
    seconds = np.floor(np.asarray(result.started)).astype(int)
    latency = np.asarray(result.latency_ms)
    failed_seconds = np.floor(np.asarray(result.failed_at)).astype(int)
    rows = []
    for second in range(int(seconds.max()) + 1):
        in_bucket = seconds == second
        if not in_bucket.any():
            continue
        values = latency[in_bucket]
        rows.append({"t": float(second), "rps": float(in_bucket.sum()),
                     "failures": float((failed_seconds == second).sum()),
                     "p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))})
    return rows


def _num(record: dict[str, str], key: str) -> float:
    value = record.get(key) or "nan"
    return float(value) if value != "N/A" else float("nan")


def locust_timeline(history_csv: Path) -> list[dict[str, float]]:
    """Locust's *_stats_history.csv (aggregated rows) in the same shape as `timeline`."""
    rows: list[dict[str, float]] = []
    with history_csv.open() as handle:
        records = [r for r in csv.DictReader(handle) if r.get("Name") == "Aggregated"]
    if not records:
        return rows
    t0 = float(records[0]["Timestamp"])
    for record in records:
        rows.append({"t": float(record["Timestamp"]) - t0, "rps": _num(record, "Requests/s"),
                     "failures": _num(record, "Failures/s"), "p50": _num(record, "50%"), "p99": _num(record, "99%"),
                     "users": _num(record, "User Count")})
    return rows


def plot(summary: dict[str, Any], rows: list[dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    t = [r["t"] for r in rows]
    top.plot(t, [r["rps"] for r in rows], label="requests/s")
    top.plot(t, [r["failures"] for r in rows], label="failures/s", color="tab:red")
    top.set_ylabel("per second")
    top.legend(loc="upper left")
    bottom.plot(t, [r["p50"] for r in rows], label="P50")
    bottom.plot(t, [r["p99"] for r in rows], label="P99")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("time (s)")
    bottom.legend(loc="upper left")
    latency = summary["latency_ms"]
    figure.suptitle(f"{summary['model']} over {summary['protocol']}, {summary['users']} users: "
                    f"{summary['qps']} req/s, P99 {latency['p99']} ms, success {summary['success_rate']:.1%}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write(summary: dict[str, Any], out_dir: Path, rows: list[dict[str, float]] | None = None,
          timeline: list[dict[str, float]] | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else (timeline or [])
    summary_path = out_dir / SUMMARY
    summary_path.write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return [summary_path, plot(summary, rows, out_dir / PLOT)]
