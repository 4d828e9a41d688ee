"""`make bench`: one model, one payload set, four ways of serving it, several concurrency levels.

    python -m loadtest.bench --model resnet18 --levels 1,4,16 --duration 20

1. tsforge: the archive's handler on TorchServe (model_store/MODEL.mar as built)
2. stock:   TorchServe's own handler (image_classifier for image models) on the same TorchScript file
3. flask:   a plain Flask server, one fp32 forward pass per request (loadtest/flask_baseline.py)
4. ceiling: the archive's handler in this process, a batched loop, no server (decode+infer+encode), and
            the forward pass alone

Every answer is checked against the in-process reference; throughput counts correct answers only.
With --matrix, the archive is also served with each backend x precision x fusion pinned (loadtest/matrix.py)
at the highest level, beside the variant `auto` chose (read from the management API's model description).
Writes reports/bench/MODEL/bench.json, bench.md (the table) and bench.png (throughput vs P99).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import requests
import yaml

from export.registry import get
from loadtest import matrix, report
from loadtest.inprocess import PLAIN_FP32, ceiling, prepared_cases, unpack
from loadtest.loadgen import load
from loadtest.monitor import MetricsScraper, monitored
from loadtest.payloads import Case
from loadtest.serving import selection, torchserve
from tsforge.project import ROOT
from tsforge.server import free_port

# TorchServe's stock handler for each tsforge handler, where one exists.
STOCK_HANDLERS = {"image_handler.py": "image_classifier"}
TARGETS = ("tsforge", "stock", "flask", "ceiling")
BENCH_BUILD = ROOT / "build" / "bench"


def stock_archive(model: str, store: Path) -> Path | None:
    """MODEL.mar with TorchServe's stock handler around build/MODEL/MODEL.pt; None when there is no stock handler."""
    stock = STOCK_HANDLERS.get(Path(get(model).handler).name)
    if stock is None:
        return None
    export_dir = ROOT / "build" / model
    store.mkdir(parents=True, exist_ok=True)
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    command = [str(archiver), "--model-name", model, "--version", "stock", "--handler", stock,
               "--serialized-file", str(export_dir / f"{model}.pt"), "--export-path", str(store), "--force"]
    labels = export_dir / "index_to_name.json"
    if labels.is_file():
        command += ["--extra-files", str(labels)]
    subprocess.run(command, check=True)
    return store / f"{model}.mar"


def measure(cases: list[Case], level: int, duration: float, url: str, pid: int | None, *, single_process: bool,
            metrics_url: str | None, model: str) -> dict[str, Any]:
    scraper = MetricsScraper(metrics_url, model) if metrics_url else None
    if scraper:
        scraper.start()
    with monitored(pid, single_process=single_process) as usage:
        result = load(cases, level, duration, url=url)
    torchserve_metrics = scraper.stop() if scraper else {}
    summary = report.summarize(result, tool="loadgen", model=model, protocol="rest", users=level, target=url,
                               server=usage, torchserve=torchserve_metrics)
    summary.pop("machine")
    return summary


def run_torchserve(label: str, model: str, store: Path, cases: list[Case], levels: list[int],
                   duration: float, warmup: float, described: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows for each level; `described` receives the handler's description of how it runs the model."""
    rows = []
    with torchserve([model], store=store, name=f"bench-{label}") as server:
        if described is not None:
            described.update(selection(server, model))
        url = f"{server.url('inference')}/predictions/{model}"
        load(cases, max(levels), warmup, url=url, warmup_s=0.0)  # the JVM's JIT, TorchScript profiling, oneDNN caches
        for level in levels:
            summary = measure(cases, level, duration, url, report.server_pid(server.run_dir), single_process=False,
                              metrics_url=server.url("metrics"), model=model)
            rows.append({**summary, "target": label, "url": summary["target"], "level": level})
            print(f"  {label:8s} c={level:<3d} {summary['qps']:8.1f} req/s  P50 {summary['latency_ms']['p50']:7.1f} ms"
                  f"  P99 {summary['latency_ms']['p99']:7.1f} ms  ok {summary['success_rate']:.1%}", flush=True)
    return rows


@contextlib.contextmanager
def flask_server(mar: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    log = (BENCH_BUILD / "flask.log").open("wb")
    command = [sys.executable, "-m", "loadtest.flask_baseline", "--mar", str(mar), "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the Flask baseline exited; see {log.name}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(base + "/ping", timeout=1).ok:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the Flask baseline did not start in 120 s")
            time.sleep(0.3)
        yield base, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def run_flask(model: str, mar: Path, cases: list[Case], levels: list[int], duration: float,
              warmup: float) -> list[dict[str, Any]]:
    rows = []
    with flask_server(mar) as (base, pid):
        url = f"{base}/predictions/{model}"
        load(cases, max(levels), warmup, url=url, warmup_s=0.0)
        for level in levels:
            summary = measure(cases, level, duration, url, pid, single_process=True, metrics_url=None, model=model)
            rows.append({**summary, "target": "flask", "url": summary["target"], "level": level})
            print(f"  flask    c={level:<3d} {summary['qps']:8.1f} req/s  P50 {summary['latency_ms']['p50']:7.1f} ms"
                  f"  P99 {summary['latency_ms']['p99']:7.1f} ms  ok {summary['success_rate']:.1%}", flush=True)
    return rows


def served_as(other: Path) -> dict[str, Any]:
    """How another build's config runs the model, as settings for this build's handler: the reference for its
    answers comes from this build's code (an older archive's handler may not import beside it)."""
    with zipfile.ZipFile(other) as opened:
        handler = (yaml.safe_load(opened.read("model-config.yaml")) or {}).get("handler") or {}
    return {"backend": handler.get("backend", "torchscript"), "precision": handler.get("precision", "fp32"),
            "onednn_fusion": handler.get("onednn_fusion", False)}


def run_matrix(model: str, mar: Path, payload_count: int, level: int, duration: float,
               warmup: float) -> dict[str, Any]:
    rows = []
    for n, variant in enumerate(matrix.cells(mar, ROOT / "build" / model)):
        store = BENCH_BUILD / "matrix" / str(n)
        pinned = matrix.pinned_archive(model, variant, mar, ROOT / "build", store)
        print(f"  matrix cell {variant.name}", flush=True)
        try:
            cases = [c for c in prepared_cases(model, pinned, payload_count) if c.raw]  # this variant's own answers
            measured = run_torchserve(f"m{n}", model, pinned.parent, cases, [level], duration, warmup)[0]
        except Exception as exc:  # a variant that cannot start here is a finding, not the end of the bench
            rows.append({"variant": variant.name, "native": matrix.native(variant), "error": str(exc)[:500]})
            continue
        rows.append({"variant": variant.name, "native": matrix.native(variant), "qps": measured["qps"],
                     "p99_ms": measured["latency_ms"]["p99"], "success_rate": measured["success_rate"]})
    return {"level": level, "rows": rows}


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """qps and P99 of each row relative to tsforge at the same concurrency."""
    base = {r["level"]: r for r in rows if r["target"] == "tsforge"}
    for row in rows:
        reference = base.get(row["level"])
        if reference and reference["qps"] and row["qps"]:
            row["qps_vs_tsforge"] = round(row["qps"] / reference["qps"], 3)
            row["p99_vs_tsforge"] = round(row["latency_ms"]["p99"] / reference["latency_ms"]["p99"], 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--levels", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of load on each server before measuring (TorchServe's JVM takes ~20 s of load "
                             "to compile its hot paths)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"any of {', '.join(TARGETS)}")
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL=FILE.mar",
                        help="also serve another build of the archive (e.g. one from an earlier commit) as LABEL")
    parser.add_argument("--matrix", action="store_true",
                        help="also serve each backend x precision x fusion pinned, at the highest level")
    parser.add_argument("--payload-count", type=int, default=32)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--out", type=Path, help="default: reports/bench/MODEL")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    out = args.out or ROOT / "reports" / "bench" / args.model
    out.mkdir(parents=True, exist_ok=True)
    BENCH_BUILD.mkdir(parents=True, exist_ok=True)
    mar = args.store / f"{args.model}.mar"
    # Raw bodies only: what every server accepts alike (stock handlers take no JSON envelopes).
    cases = [c for c in prepared_cases(args.model, mar, args.payload_count) if c.raw]
    # The stock handler and Flask run the plain fp32 export: their answers are checked against that.
    fp32_cases = [c for c in prepared_cases(args.model, mar, args.payload_count, handler_overrides=PLAIN_FP32)
                  if c.raw]
    config = yaml.safe_load((unpack(mar) / "model-config.yaml").read_text()) or {}
    started = time.time()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    print(f"bench {args.model}: {len(cases)} payloads, levels {levels}, {args.duration:g} s each", flush=True)
    described: dict[str, Any] = {}
    if "tsforge" in targets:
        rows += run_torchserve("tsforge", args.model, args.store, cases, levels, args.duration, args.warmup,
                               described)
    for label, other in (c.split("=", 1) for c in args.compare):
        store = BENCH_BUILD / "compare" / label
        store.mkdir(parents=True, exist_ok=True)
        (store / f"{args.model}.mar").write_bytes(Path(other).read_bytes())
        other_cases = [c for c in prepared_cases(args.model, mar, args.payload_count,
                                                 handler_overrides=served_as(store / f"{args.model}.mar"))
                       if c.raw]
        rows += run_torchserve(label, args.model, store, other_cases, levels, args.duration, args.warmup)
    matrix_result = None
    if args.matrix:
        # as much load before its measurement as the tsforge row had before its highest level (the JVM's JIT)
        settle = args.warmup + args.duration * (len(levels) - 1)
        matrix_result = run_matrix(args.model, mar, args.payload_count, max(levels), args.duration, settle)
    if "stock" in targets:
        stock = stock_archive(args.model, BENCH_BUILD / "stock-store")
        if stock is None:
            notes.append(f"stock: TorchServe has no stock handler for {get(args.model).handler}")
        else:
            rows += run_torchserve("stock", args.model, stock.parent, fp32_cases, levels, args.duration, args.warmup)
    if "flask" in targets:
        rows += run_flask(args.model, mar, fp32_cases, levels, args.duration, args.warmup)
    ceiling_result = None
    if "ceiling" in targets:
        batch = int(config.get("batchSize", 16))
        # The best of one torch thread and one per core: which wins depends on the model and on what else runs.
        candidates = [ceiling(mar, cases, batch, args.duration / 2, threads)
                      for threads in sorted({1, os.cpu_count() or 1})]
        ceiling_result = asdict(max(candidates, key=lambda c: c.handler_items_per_s))
        print(f"  ceiling  batch {batch}: handler {ceiling_result['handler_items_per_s']} items/s, "
              f"model alone {ceiling_result['model_items_per_s']} items/s", flush=True)
    result = {
        "model": args.model,
        "archive": report.shown(mar),
        "model_config": {k: v for k, v in config.items()},
        "levels": levels,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "payloads": {"count": len(cases), "kinds": sorted({c.content_type for c in cases}),
                     "mean_bytes": round(sum(len(c.body) for c in cases) / max(1, len(cases)))},
        "command": "python -m loadtest.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "rows": with_ratios(rows),
        "selection": described,
        "matrix": matrix_result,
        "ceiling": ceiling_result,
        "notes": notes,
        "machine": report.machine(),
        "wall_s": round(time.time() - started, 1),
        "created": report.now(),
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    from loadtest.render import bench_markdown, bench_plot

    (out / "bench.md").write_text(bench_markdown(result))
    bench_plot(result, out / "bench.png")
    print(bench_markdown(result))
    print(f"reports: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
