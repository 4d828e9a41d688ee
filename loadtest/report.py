"""The summary JSON every load run writes (locust or loadgen alike), its plot, and the machine it ran on.

Summary fields: tool, model, protocol, users, target, duration_s, requests, failures, success_rate,
qps, latency_ms {mean, p50, p95, p99, max}, failure_reasons, server {cpu_percent, cores, frontend
{cpu_percent, peak_rss_mb}, workers {cpu_percent, peak_rss_mb, count}}, torchserve (its own metrics),
machine, created.

The committed summaries under docs/data/ (`write_data`) keep a few of those fields per run (`compact_row`)
beside the machine description; the docs are rendered from them (loadtest/render.py).
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

from tsforge import extras

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
    """The TorchServe started from run_dir (tsforge.serving.server writes its pid file there)."""
    try:
        return int((run_dir / "torchserve.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo's `model name`), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide which variant a worker serves (handlers/capabilities.py), as torch
    reports them on this CPU: figures from CPUs with different flags are not comparable."""
    import torch

    from handlers.capabilities import CPU_FLAGS

    reported = torch.cpu.get_capabilities()
    return [flag for flag in CPU_FLAGS if reported.get(flag) is True]


def machine() -> dict[str, Any]:
    """What a figure was measured on, taken at run time; every committed report carries it."""
    import psutil
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "torchserve": _version("torchserve") or "unknown",
        "os": f"{platform.system()} {platform.release()}",
        "date": datetime.now(timezone.utc).date().isoformat(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """The machine a report was measured on, as that report recorded it at run time."""
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU"
    flags = machine.get("cpu_flags")
    shown_flags = "" if flags is None else f" (CPU flags: {', '.join(flags) or 'none of the AVX2+ ones'})"
    runtime = f", ONNX Runtime {machine['onnxruntime']}" if machine.get("onnxruntime") else ""
    date = f"; {machine['date']}" if machine.get("date") else ""
    return (f"{machine['cpu']}, {machine['cores']} cores{shown_flags}, {machine['memory_gb']} GiB{gpu}; "
            f"Python {machine['python']}, torch {machine['torch']}{runtime}, TorchServe {machine['torchserve']}, "
            f"{machine['os']}{date}")


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


#: TorchServe's and the handler's gauges that the stage breakdown shows (the rest stay in the raw report)
BREAKDOWN_GAUGES = ("QueueTime", "WorkerThreadTime", "HandlerDecodeTime", "HandlerInferenceTime",
                    "HandlerEncodeTime", "HandlerBatchSize")
#: the committed summaries are read by people in reviews and diffs: past this they are raw reports, not data
DATA_LIMIT_BYTES = 64 * 1024
_ROW_FIELDS = ("target", "level", "setting", "stock_handler", "qps", "requests", "failures", "success_rate",
               "duration_s", "qps_vs_tsforge", "p99_vs_tsforge")


def data_dir(root: Path | None = None) -> Path:
    """docs/data/: the committed JSON the docs are rendered from and the KServe sizing is derived from."""
    from tsforge.project import ROOT

    return (root or ROOT) / "docs" / "data"


def compact_row(row: dict[str, Any]) -> dict[str, Any]:
    """A load run's summary as the committed data keeps it: figures the docs and the sizing use, no bulk."""
    server = row.get("server") or {}
    frontend, workers = server.get("frontend") or {}, server.get("workers") or {}
    kept = {key: row[key] for key in _ROW_FIELDS if key in row}
    kept["latency_ms"] = row["latency_ms"]
    kept["server"] = {"cpu_percent": server.get("cpu_percent"),
                      "frontend": {"peak_rss_mb": frontend.get("peak_rss_mb")},
                      "workers": {"peak_rss_mb": workers.get("peak_rss_mb"), "count": workers.get("count")}}
    metrics = row.get("torchserve") or {}
    if metrics.get("per_request") or metrics.get("gauges_mean"):
        gauges = metrics.get("gauges_mean") or {}
        kept["torchserve"] = {"per_request": metrics.get("per_request") or {},
                              "gauges_mean": {k: gauges[k] for k in BREAKDOWN_GAUGES if k in gauges}}
    reasons = row.get("failure_reasons") or {}
    if reasons:
        kept["failure_reasons"] = {str(k)[:120]: v for k, v in list(reasons.items())[:3]}
    return kept


def _finite(value: Any) -> Any:
    """NaN and infinities as null: the committed files are strict JSON that any reader parses."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_data(summary: dict[str, Any], path: Path) -> Path:
    """Write a committed summary; refuses one that has grown into a raw report."""
    text = json.dumps(_finite(summary), indent=1, allow_nan=False) + "\n"
    if len(text.encode()) > DATA_LIMIT_BYTES:
        raise ValueError(f"{path.name} would be {len(text.encode()):,} bytes (> {DATA_LIMIT_BYTES:,}): "
                         "keep bulk in the raw report under reports/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


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
    extras.require("matplotlib", "plots", f"the plot {path.name}")
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


def replace_generated_block(path: Path, begin: str, end: str, content: str) -> None:
    """Replace what stands between the `begin` and `end` markers of a page; the prose around them stays as written."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: no generated block ({begin} ... {end})")
    before, rest = text.split(begin, 1)
    after = rest.split(end, 1)[1]
    path.write_text(f"{before}{begin}\n{content}{end}{after}")
