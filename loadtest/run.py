"""`make loadtest`: a headless load run against a TorchServe of its own (or a running one), with reports.

    python -m loadtest.run --model digits --users 16 --spawn-rate 8 --duration 30 --protocol rest

Writes into reports/loadtest/MODEL-PROTOCOL/: locust's CSV files and HTML report (with --tool locust),
summary.json (QPS, P50/P95/P99, success rate, server CPU % and peak RSS of frontend and workers,
TorchServe's own latency metrics) and summary.png. Without locust installed, the built-in closed-loop
generator (loadtest.loadgen) runs instead and writes the same summary.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtest import report
from loadtest.inprocess import prepared_cases
from loadtest.loadgen import LoadResult, load
from loadtest.monitor import MetricsScraper, monitored
from loadtest.payloads import mislabel, save
from loadtest.serving import torchserve
from tsforge import extras
from tsforge.project import ROOT
from tsforge.serving.server import TorchServe

LOCUSTFILES = ROOT / "loadtest" / "locustfiles"


def locust_available() -> bool:
    return importlib.util.find_spec("locust") is not None and shutil.which("locust", path=str(
        Path(sys.executable).parent)) is not None


def run_locust(args: argparse.Namespace, server: TorchServe, payloads: Path, out: Path) -> dict[str, Any]:
    locustfile = LOCUSTFILES / f"{args.model}.py"
    if not locustfile.is_file():
        known = sorted(p.stem for p in LOCUSTFILES.glob("*.py") if p.stem not in ("__init__", "base"))
        raise SystemExit(f"no locustfile for {args.model}; there are: {', '.join(known)}")
    command = [
        str(Path(sys.executable).with_name("locust")), "-f", str(locustfile),
        "Grpc" if args.protocol == "grpc" else "Rest",
        "--headless", "--only-summary", "--loglevel", "WARNING",
        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration:g}s", "--stop-timeout", "10",
        "--host", server.url("inference"), "--grpc-target", f"127.0.0.1:{server.props['grpc_inference_port']}",
        "--payloads", str(payloads),
        "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "locust.html"),
    ]
    # Locust exits 1 when any request failed; failures are reported, not raised.
    subprocess.run(command, check=False, cwd=ROOT)
    return read_locust_stats(out / "locust")


def read_locust_stats(prefix: Path) -> dict[str, Any]:
    stats = prefix.with_name(prefix.name + "_stats.csv")
    with stats.open() as handle:
        aggregated = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    failures: dict[str, int] = {}
    failures_csv = prefix.with_name(prefix.name + "_failures.csv")
    if failures_csv.is_file():
        with failures_csv.open() as handle:
            for row in csv.DictReader(handle):
                reason = re.sub(r"^\w+\((['\"])(.*)\1\)$", r"\2", row["Error"])  # CatchResponseError("...")
                failures[reason] = failures.get(reason, 0) + int(row["Occurrences"])
    return {"stats": aggregated, "failures": failures}


def summary_from_locust(locust: dict[str, Any], duration_s: float) -> LoadResult:
    """Locust's failure counts as a LoadResult; its request count, rate and percentiles are taken as they are."""
    return LoadResult(failures=locust["failures"], failed=int(locust["stats"]["Failure Count"]), elapsed_s=duration_s)


def locust_latency(stats: dict[str, str]) -> dict[str, float]:
    def num(key: str) -> float:
        return float(stats[key]) if stats.get(key) not in (None, "", "N/A") else float("nan")

    return {"mean": round(num("Average Response Time"), 2), "p50": num("50%"), "p95": num("95%"),
            "p99": num("99%"), "max": round(num("Max Response Time"), 2)}


def locust_summary(locust: dict[str, Any], duration_s: float, common: dict[str, Any]) -> dict[str, Any]:
    """The summary of a locust run: its own request count, rate and percentiles, throughput of correct answers."""
    stats = locust["stats"]
    result = summary_from_locust(locust, duration_s)
    summary = report.summarize(result, **common)
    requests_done = int(stats["Request Count"])
    ok = requests_done - result.failed
    summary.update(requests=requests_done, success_rate=round(ok / requests_done, 4) if requests_done else 0.0,
                   qps=round(float(stats["Requests/s"]) * ok / requests_done, 2) if requests_done else 0.0,
                   latency_ms=locust_latency(stats), files={"csv": "locust_stats.csv", "html": "locust.html"})
    return summary


@contextlib.contextmanager
def target(args: argparse.Namespace) -> Iterator[TorchServe]:
    if args.run_dir:
        yield TorchServe.attach(args.run_dir)
        return
    with torchserve([args.model], store=args.store, name=f"loadtest-{args.model}") as server:
        yield server


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--spawn-rate", type=float, default=16.0)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds")
    parser.add_argument("--protocol", choices=["rest", "grpc"], default="rest")
    parser.add_argument("--tool", choices=["auto", "locust", "loadgen"], default="auto")
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--run-dir", type=Path, help="load a TorchServe already started from this run folder")
    parser.add_argument("--payload-count", type=int, default=32)
    parser.add_argument("--mislabel-every", type=int, default=0,
                        help="canary: expect a wrong label for every N-th payload (those must count as failures)")
    parser.add_argument("--out", type=Path, help="default: reports/loadtest/MODEL-PROTOCOL")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tool = ("locust" if locust_available() else "loadgen") if args.tool == "auto" else args.tool
    if tool == "locust":
        extras.need("locust", "loadtest", "--tool locust")  # `auto` falls back on loadgen without it
    out = args.out or ROOT / "reports" / "loadtest" / f"{args.model}-{args.protocol}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    cases = mislabel(prepared_cases(args.model, args.store / f"{args.model}.mar", args.payload_count),
                     args.mislabel_every)
    payloads = out / "payloads.json"
    save(cases, payloads)
    with target(args) as server:
        grpc_target = f"127.0.0.1:{server.props['grpc_inference_port']}"
        rest_url = f"{server.url('inference')}/predictions/{args.model}"
        scraper = MetricsScraper(server.url("metrics"), args.model)
        scraper.start()
        with monitored(report.server_pid(server.run_dir)) as usage:
            if tool == "locust":
                locust = run_locust(args, server, payloads, out)
            else:
                result = load(cases, args.users, args.duration, model=args.model,
                              url=None if args.protocol == "grpc" else rest_url,
                              grpc_target=grpc_target if args.protocol == "grpc" else None)
        metrics = scraper.stop()
        target_name = server.url("inference") if args.protocol == "rest" else f"grpc:{grpc_target.split(':')[1]}"

    common = {"tool": tool, "model": args.model, "protocol": args.protocol, "users": args.users,
              "target": target_name, "server": usage, "torchserve": metrics, "spawn_rate": args.spawn_rate,
              "payloads": len(cases)}
    if tool == "locust":
        summary = locust_summary(locust, args.duration, common)
        rows = report.locust_timeline(out / "locust_stats_history.csv")
    else:
        summary = report.summarize(result, **common)
        rows = report.timeline(result)
    paths = report.write(summary, out, rows=rows)
    latency = summary["latency_ms"]
    print(f"{args.model} {args.protocol} {tool}: {summary['requests']} requests, {summary['qps']} correct/s, "
          f"P50 {latency['p50']} ms, P95 {latency['p95']} ms, P99 {latency['p99']} ms, "
          f"success {summary['success_rate']:.2%}, server CPU {usage.get('cpu_percent')} %")
    print(f"reports: {out} ({', '.join(p.name for p in paths)})")
    return 0 if summary["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
