"""What the server spends while it is loaded: CPU and peak memory of its process tree, and its own metrics.

`ProcessMonitor` samples a process tree with psutil (TorchServe: the Java frontend and the Python
workers; a Flask baseline: one process). `MetricsScraper` reads TorchServe's Prometheus endpoint before
and after a run, and samples its gauges during it, for the where-does-the-time-go breakdown.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import requests

WORKER_MARK = "model_service_worker"
# Family names as prometheus_client parses them (it strips a counter's "_total").
COUNTERS = ("ts_inference_requests", "ts_inference_latency_microseconds", "ts_queue_latency_microseconds")
GAUGES = ("QueueTime", "WorkerThreadTime", "HandlerDecodeTime", "HandlerInferenceTime", "HandlerEncodeTime",
          "HandlerBatchSize", "HandlerTime", "PredictionTime")


def role(process: psutil.Process) -> str:
    """frontend (TorchServe's Java process, or a single-process server) or worker (a TorchServe Python worker)."""
    try:
        cmdline = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if WORKER_MARK in cmdline:
        return "worker"
    if "org.pytorch.serve.ModelServer" in cmdline or process.name() == "java":
        return "frontend"
    return "launcher"


def worker_threads(pid: int | None) -> list[int | None]:
    """The OMP_NUM_THREADS each TorchServe worker under `pid` runs with, read from the worker's own environment
    (torch sizes its intra-op pool from it at start); None for a worker that has none (torch then takes every
    core)."""
    if pid is None:
        return []
    try:
        tree = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    seen: list[int | None] = []
    for process in tree:
        if role(process) != "worker":
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            value = process.environ().get("OMP_NUM_THREADS")
            seen.append(int(value) if value else None)
    return seen


@dataclass
class ProcessMonitor:
    """Samples CPU time and RSS of `pid` and its descendants every `interval` seconds on a thread."""

    pid: int
    interval: float = 0.5
    single_process: bool = False
    _first_cpu: dict[int, float] = field(default_factory=dict)
    _last_cpu: dict[int, float] = field(default_factory=dict)
    _roles: dict[int, str] = field(default_factory=dict)
    _peak_rss: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _worker_count: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _started: float = 0.0
    _elapsed: float = 0.0

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> None:
        rss: dict[str, float] = defaultdict(float)
        workers = 0
        for process in self._tree():
            try:
                with process.oneshot():
                    kind = self._roles.get(process.pid) or ("frontend" if self.single_process else role(process))
                    self._roles[process.pid] = kind
                    times = process.cpu_times()
                    cpu = times.user + times.system
                    rss[kind] += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self._first_cpu.setdefault(process.pid, cpu)
            self._last_cpu[process.pid] = cpu
            workers += kind == "worker"
        for kind, value in rss.items():
            self._peak_rss[kind] = max(self._peak_rss[kind], value)
        self._worker_count = max(self._worker_count, workers)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="process-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._elapsed = time.monotonic() - self._started
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.sample()
        return self.result()

    def result(self) -> dict[str, Any]:
        elapsed = max(self._elapsed, 1e-9)
        cpu: dict[str, float] = defaultdict(float)
        for pid, last in self._last_cpu.items():
            cpu[self._roles.get(pid, "launcher")] += last - self._first_cpu[pid]

        def part(kind: str) -> dict[str, float]:
            return {"cpu_percent": round(100.0 * cpu[kind] / elapsed, 1),
                    "peak_rss_mb": round(self._peak_rss[kind] / 2**20, 1)}

        total = sum(cpu.values())
        return {
            "cpu_percent": round(100.0 * total / elapsed, 1),
            "cores": psutil.cpu_count(),
            "frontend": part("frontend"),
            "workers": {**part("worker"), "count": self._worker_count},
        }


@contextlib.contextmanager
def monitored(pid: int | None, single_process: bool = False) -> Iterator[dict[str, Any]]:
    """Fills the yielded dict with the monitor's result when the block ends; empty when there is no pid."""
    result: dict[str, Any] = {}
    if pid is None:
        yield result
        return
    monitor = ProcessMonitor(pid, single_process=single_process)
    monitor.start()
    try:
        yield result
    finally:
        result.update(monitor.stop())


# ---- TorchServe's own metrics --------------------------------------------------------------------

def scrape(metrics_url: str, model: str | None = None) -> dict[str, float]:
    """Counters summed and gauges averaged over their label sets (for one model when given)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = requests.get(metrics_url.rstrip("/") + "/metrics", timeout=5).text
    except requests.RequestException:
        return {}
    values: dict[str, list[float]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            owner = labels.get("model_name", labels.get("ModelName"))
            if model is not None and owner is not None and owner != model:
                continue
            values[family.name].append(sample.value)
    return {name: (sum(v) if name in COUNTERS else sum(v) / len(v)) for name, v in values.items()}


@dataclass
class MetricsScraper:
    """Counters before/after a run and gauge samples during it (gauges hold the last batch's value)."""

    metrics_url: str
    model: str | None = None
    interval: float = 1.0
    _before: dict[str, float] = field(default_factory=dict)
    _samples: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        for name, value in scrape(self.metrics_url, self.model).items():
            if name in GAUGES:
                self._samples[name].append(value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> None:
        self._before = scrape(self.metrics_url, self.model)
        self._thread = threading.Thread(target=self._run, name="metrics-scraper", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread:
            self._thread.join()
        after = scrape(self.metrics_url, self.model)
        delta = {name: after.get(name, 0.0) - self._before.get(name, 0.0) for name in COUNTERS}
        requests_done = delta["ts_inference_requests"]
        per_request = {}
        if requests_done > 0:
            per_request = {
                "inference_latency_ms": round(delta["ts_inference_latency_microseconds"] / requests_done / 1000, 3),
                "queue_latency_ms": round(delta["ts_queue_latency_microseconds"] / requests_done / 1000, 3),
            }
        gauges = {name: round(sum(v) / len(v), 3) for name, v in self._samples.items() if v}
        return {"requests": requests_done, "per_request": per_request, "gauges_mean": gauges}
