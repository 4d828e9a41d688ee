"""Soak: a fixed number of closed-loop requests per model against one TorchServe, with the RSS of the frontend and
of every worker sampled over time; reports the growth after warm-up (goal: at most 5 %).

    python -m loadtest.soak --digits-requests 100000 --resnet18-requests 20000
    python -m loadtest.soak --digits-requests 500 --resnet18-requests 0 --out build/soak-smoke   # a quick check

Starts its own TorchServe (development profile, free loopback ports) in <out>/serve and stops it at the end.
Writes <out>/soak.json (every sample), soak.png (RSS over time) and soak.md (one row per process), and the small
summary to commit (`--data`; `make soak`: docs/data/soak.json, rendered into docs/reliability.md).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from loadtest.loadgen import RestClient
from loadtest.payloads import Case, check
from loadtest.report import machine, now, shown, write_data
from tsforge import extras
from tsforge.project import ROOT
from tsforge.serving.server import TorchServe, free_port_overrides, model_args

GOAL_PCT = 5.0
SCHEMA = "tsforge.soak/1"
WINDOW = 0.1  # baseline: the first tenth of the samples after warm-up; final: the last tenth


@dataclass
class Progress:
    """Requests sent, answered and failed per model; the soak is warm once every model is past its warm-up."""

    target: int
    done: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


async def user(client: RestClient, cases: list[Case], offset: int, progress: Progress, claimed: list[int]) -> None:
    for case in itertools.islice(itertools.cycle(cases), offset, None):
        if claimed[0] >= progress.target:
            return
        claimed[0] += 1
        try:
            status, body = await client.send(case)
            reason = check(case, status, body)
        except Exception as exc:  # a refused or cut connection is a failed request, not a crash
            reason = type(exc).__name__
        progress.done += 1
        if reason is not None:
            progress.fail(reason)


async def drive(url: str, cases: list[Case], users: int, progress: Progress) -> None:
    clients = [RestClient(url) for _ in range(users)]
    claimed = [0]
    progress.started = time.monotonic()
    step = max(1, len(cases) // users)
    try:
        await asyncio.gather(*(user(c, cases, n * step, progress, claimed) for n, c in enumerate(clients)))
    finally:
        for client in clients:
            await client.close()
    progress.finished = time.monotonic()


class RssSampler:
    """RSS (MB) of the frontend and each worker every `interval` s; workers are named MODEL/PID."""

    def __init__(self, server: TorchServe, models: list[str], interval: float) -> None:
        self.server, self.models, self.interval = server, models, interval
        self.began = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def processes(self) -> dict[str, psutil.Process]:
        named = {"frontend": self._frontend()}
        for model in self.models:
            described = requests.get(f"{self.server.url('management')}/models/{model}",
                                     headers=self.server.auth("management"), timeout=10).json()
            for worker in described[0]["workers"]:
                if int(worker["pid"]) > 0:
                    named[f"{model}/{worker['pid']}"] = psutil.Process(int(worker["pid"]))
        return named

    def _frontend(self) -> psutil.Process:
        root = psutil.Process(int(self.server.pid_file.read_text()))
        java = [p for p in [root, *root.children(recursive=True)] if "org.pytorch.serve.ModelServer" in
                " ".join(p.cmdline())]
        return java[0] if java else root

    def sample(self, named: dict[str, psutil.Process], progress: dict[str, Progress]) -> None:
        rss = {}
        for name, process in named.items():
            try:
                rss[name] = round(process.memory_info().rss / 2**20, 2)
            except psutil.NoSuchProcess:
                continue
        self.samples.append({"t": round(time.monotonic() - self.began, 2), "rss_mb": rss,
                             "done": {m: p.done for m, p in progress.items()}})

    def start(self, progress: dict[str, Progress]) -> None:
        self._thread = threading.Thread(target=self._run, args=(progress,), name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self, progress: dict[str, Progress]) -> None:
        named = self.processes()
        while True:
            self.sample(named, progress)
            if self._stop.wait(self.interval):
                break
            if any(not p.is_running() for p in named.values()):
                named = self.processes()  # a worker was replaced: follow the new one

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def process_names(samples: list[dict[str, Any]]) -> list[str]:
    """Every process sampled, once, in the order first seen: a worker that replaced another comes after it."""
    return list(dict.fromkeys(name for s in samples for name in s["rss_mb"]))


def labels(names: list[str]) -> dict[str, str]:
    """Table labels: `frontend`, and `MODEL worker N (pid P)` with N counting each model's workers from 1, so two
    workers of one model (ResNet-18 has two) read as two rows, not as one row printed twice."""
    counts: dict[str, int] = {}
    out = {}
    for name in names:
        model, _, pid = name.partition("/")
        if not pid:
            out[name] = name
            continue
        counts[model] = counts.get(model, 0) + 1
        out[name] = f"{model} worker {counts[model]} (pid {pid})"
    return out


def growth(samples: list[dict[str, Any]], progress: dict[str, Progress], warmup: float) -> dict[str, Any]:
    """Per process: mean RSS over the first and the last tenth of the samples taken after warm-up (every model
    past `warmup` of its requests), the growth between them, and the peak."""
    warm = [s for s in samples if all(s["done"][m] >= warmup * p.target for m, p in progress.items())]
    warm = warm or samples
    span = max(1, int(len(warm) * WINDOW))
    rows = {}
    for name, label in labels(process_names(samples)).items():
        series = [s["rss_mb"][name] for s in warm if name in s["rss_mb"]]
        if len(series) < 2:
            continue
        first, last = statistics.fmean(series[:span]), statistics.fmean(series[-span:])
        rows[name] = {"label": label, "baseline_mb": round(first, 1), "final_mb": round(last, 1),
                      "peak_mb": round(max(s["rss_mb"].get(name, 0.0) for s in samples), 1),
                      "growth_pct": round(100.0 * (last / first - 1.0), 2)}
    return {"warm_from_s": warm[0]["t"], "processes": rows}


def plot(samples: list[dict[str, Any]], warm_from: float, path: Path) -> None:
    extras.require("matplotlib", "plots", f"the plot {path.name}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, label in labels(process_names(samples)).items():
        points = [(s["t"], s["rss_mb"][name]) for s in samples if name in s["rss_mb"]]
        ax.plot([t for t, _ in points], [v for _, v in points], label=label)
    ax.axvline(warm_from, color="grey", linestyle="--", label="warm")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("TorchServe RSS during the soak")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict[str, Any]) -> str:
    lines = ["| process | baseline MB | final MB | peak MB | growth after warm-up | goal |",
             "|---|---|---|---|---|---|"]
    for row in summary["rss"]["processes"].values():
        lines.append(f"| {row['label']} | {row['baseline_mb']} | {row['final_mb']} "
                     f"| {row['peak_mb']} | {row['growth_pct']:+.2f} % "
                     f"| ≤ {GOAL_PCT:g} % |")
    lines += ["", "| model | requests | failed | seconds | requests/s |", "|---|---|---|---|---|"]
    for model, run in summary["models"].items():
        lines.append(f"| {model} | {run['requests']} | {run['failed']} | {run['seconds']} | {run['rate']} |")
    return "\n".join(lines) + "\n"


def verdict(summary: dict[str, Any]) -> list[str]:
    """What breaks the soak's bounds, one line each (empty: it passed): a process whose RSS grew by more than
    GOAL_PCT after warm-up, a failed request, or no process measured at all (nothing to judge is no pass)."""
    rows = summary["rss"]["processes"]
    problems = [f"{row['label']}: RSS grew {row['growth_pct']:+.2f} % after warm-up "
                f"({row['baseline_mb']} -> {row['final_mb']} MB), over the {GOAL_PCT:g} % bound"
                for row in rows.values() if row["growth_pct"] > GOAL_PCT]
    if not rows:
        problems.append("no process had two RSS samples after warm-up")
    problems += [f"{model}: {run['failed']} of {run['requests']} requests failed {run.get('failure_reasons', {})}"
                 for model, run in summary["models"].items() if run["failed"]]
    return problems


def data_summary(summary: dict[str, Any], command: str, raw_report: Path) -> dict[str, Any]:
    """The soak as docs/data/soak.json keeps it (docs/data/README.md): per process the RSS growth after warm-up,
    per model requests, failures and rate, the bound, the verdict and the machine; no samples."""
    problems = verdict(summary)
    return {
        "schema": SCHEMA, "created": summary.get("created"), "command": command, "machine": summary.get("machine"),
        "goal_pct": GOAL_PCT, "warmup_fraction": summary.get("warmup_fraction"),
        "interval_s": summary.get("interval_s"), "samples": len(summary.get("samples") or []),
        "models": {model: {"requests": run["requests"], "failed": run["failed"], "users": run.get("users"),
                           "seconds": run.get("seconds"), "rate": run.get("rate"),
                           "failure_reasons": {str(k)[:120]: v for k, v in
                                               list((run.get("failure_reasons") or {}).items())[:3]}}
                   for model, run in summary["models"].items()},
        "rss": {"warm_from_s": summary["rss"]["warm_from_s"], "processes": summary["rss"]["processes"]},
        "max_growth_pct": max((r["growth_pct"] for r in summary["rss"]["processes"].values()), default=None),
        "verdict": "fail" if problems else "pass", "problems": problems, "raw_report": shown(raw_report),
    }


def run(targets: dict[str, int], users: dict[str, int], out: Path, interval: float, warmup: float,
        store: Path) -> dict[str, Any]:
    from loadtest.inprocess import prepared_cases

    models = [m for m, n in targets.items() if n > 0]
    cases = {m: prepared_cases(m, store / f"{m}.mar") for m in models}
    server = TorchServe(run_dir=out / "serve", model_store=store, models=model_args(models),
                        overrides=free_port_overrides())
    server.start()
    try:
        server.wait_ready(models, timeout=300)
        progress = {m: Progress(targets[m]) for m in models}
        sampler = RssSampler(server, models, interval)
        sampler.start(progress)

        async def all_models() -> None:
            await asyncio.gather(*(drive(f"{server.url('inference')}/predictions/{m}", cases[m], users[m],
                                         progress[m]) for m in models))

        asyncio.run(all_models())
        sampler.stop()
    finally:
        server.stop()
    rss = growth(sampler.samples, progress, warmup)
    return {
        "created": now(), "machine": machine(), "goal_pct": GOAL_PCT, "warmup_fraction": warmup,
        "interval_s": interval,
        "models": {m: {"requests": p.done, "failed": p.failed, "failure_reasons": p.reasons, "users": users[m],
                       "seconds": round(p.finished - p.started, 1),
                       "rate": round(p.done / max(p.finished - p.started, 1e-9), 1)} for m, p in progress.items()},
        "rss": rss,
        "max_growth_pct": max((row["growth_pct"] for row in rss["processes"].values()), default=None),
        "samples": sampler.samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits-requests", type=int, default=100_000)
    parser.add_argument("--resnet18-requests", type=int, default=20_000)
    parser.add_argument("--digits-users", type=int, default=16)
    parser.add_argument("--resnet18-users", type=int, default=8)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of each model's requests before the "
                        "baseline is taken")
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "soak")
    parser.add_argument("--data", type=Path, help="the small summary to commit (make soak: docs/data/soak.json); "
                        "default: OUT/soak-summary.json")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary = run({"digits": args.digits_requests, "resnet18": args.resnet18_requests},
                  {"digits": args.digits_users, "resnet18": args.resnet18_users}, out, args.interval, args.warmup,
                  args.store)
    (out / "soak.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary["samples"], summary["rss"]["warm_from_s"], out / "soak.png")
    (out / "soak.md").write_text(table(summary))
    command = "python -m loadtest.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    data = write_data(data_summary(summary, command.strip(), out / "soak.json"), args.data or out / "soak-summary.json")
    print(table(summary))
    print(f"reports: {shown(out / 'soak.json')}, {shown(out / 'soak.png')}, {shown(out / 'soak.md')}; "
          f"summary: {shown(data)}")
    problems = verdict(summary)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
