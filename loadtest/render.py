"""Render bench and tune reports (JSON) as markdown tables and plots; docs/benchmarks.md is made from them.

    python -m loadtest.render --bench reports/bench/resnet18/bench.json reports/bench/digits/bench.json \
        --tune reports/tune/digits/tune.json --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from loadtest import matrix
from tsforge.project import ROOT

TARGET_NAMES = {
    "tsforge": "tsforge handler on TorchServe",
    "stock": "TorchServe stock handler",
    "flask": "Flask, per-request fp32",
}


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def machine_line(machine: dict[str, Any]) -> str:
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU"
    return (f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GiB{gpu}; Python {machine['python']}, "
            f"torch {machine['torch']}, TorchServe {machine['torchserve']}, {machine['os']}")


def bench_markdown(result: dict[str, Any]) -> str:
    config = result.get("model_config") or {}
    handler = config.get("handler") or {}
    lines = [
        f"### {result['model']}: {result['payloads']['count']} payloads "
        f"({', '.join(result['payloads']['kinds'])}, {result['payloads']['mean_bytes']} bytes on average)",
        "",
        f"Run {result['created']}, {result['duration_s']:g} s per level, `{result['command']}`  ",
        f"Machine: {machine_line(result['machine'])}  ",
        f"tsforge archive settings: workers {config.get('maxWorkers', '?')}, batchSize {config.get('batchSize', '?')}, "
        f"maxBatchDelay {config.get('maxBatchDelay', '?')} ms, handler "
        f"{', '.join(f'{k}={v}' for k, v in handler.items() if k in ('precision', 'channels_last', 'threads')) or '-'}",
        "",
        "| server | concurrency | correct req/s | P50 ms | P95 ms | P99 ms | success | req/s vs tsforge "
        "| P99 vs tsforge | server CPU % | peak RSS MB (frontend / workers) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        latency, server = row["latency_ms"], row.get("server") or {}
        frontend, workers = server.get("frontend", {}), server.get("workers", {})
        rss = f"{_f(frontend.get('peak_rss_mb'), 0)} / {_f(workers.get('peak_rss_mb'), 0)}"
        lines.append(
            f"| {TARGET_NAMES.get(row['target'], row['target'])} | {row['level']} | {_f(row['qps'])} "
            f"| {_f(latency['p50'])} | {_f(latency['p95'])} | {_f(latency['p99'])} | {row['success_rate']:.1%} "
            f"| {_x(row.get('qps_vs_tsforge'))} | {_x(row.get('p99_vs_tsforge'))} "
            f"| {_f(server.get('cpu_percent'), 0)} | {rss} |")
    ceiling = result.get("ceiling")
    if ceiling:
        lines += ["", f"In-process ceiling (no server, batches of {ceiling['batch_size']}, torch threads: "
                  f"{ceiling['threads']}): **{_f(ceiling['handler_items_per_s'])} items/s** with decode and encode, "
                  f"{_f(ceiling['model_items_per_s'])} items/s for the forward pass alone."]
        best = max((r["qps"] for r in result["rows"] if r["target"] == "tsforge"), default=None)
        if best and ceiling["handler_items_per_s"]:
            lines.append(f"Best served tsforge throughput is {best / ceiling['handler_items_per_s']:.0%} of the "
                         "in-process handler ceiling.")
    lines += [*matrix.markdown(result), "", *breakdown_markdown(result),
              *(f"- note: {n}" for n in result.get("notes", []))]
    return "\n".join(lines) + "\n"


def breakdown_markdown(result: dict[str, Any]) -> list[str]:
    """Where the time of one request goes, at the highest concurrency, from TorchServe's and the handler's metrics."""
    rows = [r for r in result["rows"] if r["target"] == "tsforge" and r.get("torchserve")]
    if not rows:
        return []
    row = max(rows, key=lambda r: r["level"])
    metrics, gauges = row["torchserve"], row["torchserve"].get("gauges_mean", {})
    per_request = metrics.get("per_request", {})
    batch = gauges.get("HandlerBatchSize")
    lines = [
        f"Where the time goes (tsforge, concurrency {row['level']}; TorchServe counters averaged per request, "
        "gauges averaged over 1 s samples of the last batch):",
        "",
        "| stage | ms | source |",
        "|---|---:|---|",
        f"| client round trip (mean) | {_f(row['latency_ms']['mean'], 2)} | load generator |",
        f"| frontend -> worker -> frontend, incl. queue | {_f(per_request.get('inference_latency_ms'), 2)} "
        "| ts_inference_latency_microseconds / ts_inference_requests_total |",
        f"| waiting in the model's queue | {_f(per_request.get('queue_latency_ms'), 2)} "
        "| ts_queue_latency_microseconds |",
        f"| QueueTime (last batch) | {_f(gauges.get('QueueTime'), 2)} | QueueTime |",
        f"| worker thread, excluding the handler | {_f(gauges.get('WorkerThreadTime'), 2)} | WorkerThreadTime |",
        f"| decode, whole batch | {_f(gauges.get('HandlerDecodeTime'), 2)} | HandlerDecodeTime |",
        f"| inference, whole batch | {_f(gauges.get('HandlerInferenceTime'), 2)} | HandlerInferenceTime |",
        f"| encode, whole batch | {_f(gauges.get('HandlerEncodeTime'), 2)} | HandlerEncodeTime |",
        f"| batch size (mean) | {_f(batch, 1)} | HandlerBatchSize |",
        "",
    ]
    return lines


def bench_plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for target in dict.fromkeys(r["target"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["target"] == target]
        axes.plot([r["qps"] for r in rows], [r["latency_ms"]["p99"] for r in rows], marker="o",
                  label=TARGET_NAMES.get(target, target))
        for r in rows:
            axes.annotate(f"c={r['level']}", (r["qps"], r["latency_ms"]["p99"]), fontsize=7,
                          textcoords="offset points", xytext=(4, 4))
    ceiling = result.get("ceiling")
    if ceiling:
        axes.axvline(ceiling["handler_items_per_s"], color="grey", linestyle="--", label="in-process ceiling")
    axes.set_xlabel("correct requests/s")
    axes.set_ylabel("P99 latency (ms)")
    axes.set_yscale("log")
    axes.set_title(f"{result['model']}: throughput vs P99 latency by concurrency")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def tune_markdown(result: dict[str, Any], top: int = 10) -> str:
    lines = [
        f"### tuning {result['model']}: P99 <= {result['p99_ms']:g} ms at concurrency {result['users']}",
        "",
        f"Run {result['created']}, {result['trial_s']:g} s per trial, {len(result['trials'])} of "
        f"{result['grid_size']} settings tried in {result['wall_s']:.0f} s, `{result['command']}`  ",
        f"Machine: {machine_line(result['machine'])}",
        "",
        "| rank | workers | batchSize | maxBatchDelay ms | threads | correct req/s | P50 ms | P99 ms | success "
        "| meets bound |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for rank, trial in enumerate(result["trials"][:top], 1):
        s, latency = trial["setting"], trial["latency_ms"]
        lines.append(f"| {rank} | {s['workers']} | {s['batch_size']} | {s['max_batch_delay']} | {s['threads']} "
                     f"| {_f(trial['qps'])} | {_f(latency['p50'])} | {_f(latency['p99'])} "
                     f"| {trial['success_rate']:.1%} "
                     f"| {'yes' if trial['feasible'] else 'no'} |")
    best = result.get("best")
    if best:
        lines += ["", f"Best: `{json.dumps(best['setting'])}`, written to `{result['written']}`."]
        ceiling = result.get("ceiling")
        if ceiling and ceiling.get("handler_items_per_s"):
            lines.append(f"Served throughput at the best setting is {best['qps'] / ceiling['handler_items_per_s']:.0%} "
                         f"of the in-process ceiling ({_f(ceiling['handler_items_per_s'])} items/s in batches of "
                         f"{ceiling['batch_size']}).")
    else:
        lines += ["", "No setting met the bound."]
    return "\n".join(lines) + "\n"


def goals_markdown(benches: list[dict[str, Any]], tunes: list[dict[str, Any]], level: int = 16) -> str:
    """The project's performance goals, checked against the reports at hand."""
    lines = ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    for bench in benches:
        rows = {(r["target"], r["level"]): r for r in bench["rows"]}
        ours = rows.get(("tsforge", level))
        ceiling = (bench.get("ceiling") or {}).get("handler_items_per_s")
        for shown in sorted({level, max(bench.get("levels") or [level])}):
            served = rows.get(("tsforge", shown))
            if ceiling and served:
                share = served["qps"] / ceiling
                lines.append(f"| {bench['model']}: served >= 50% of the in-process ceiling at the archived (tuned) "
                             f"setting, `make bench` at concurrency {shown} | {share:.0%} ({_f(served['qps'])} of "
                             f"{_f(ceiling)} items/s) | {'yes' if share >= 0.5 else 'no'} |")
        if ("stock", level) not in rows:  # the throughput goals are set for models TorchServe has a stock handler for
            continue
        for other in ("stock", "flask"):
            theirs = rows.get((other, level))
            if not ours or not theirs:
                continue
            if not theirs["qps"]:
                lines.append(f"| {bench['model']}: tsforge >= 3x {TARGET_NAMES[other]} at concurrency {level} "
                             "| the baseline gave no correct answer in the window | - |")
                continue
            ratio = ours["qps"] / theirs["qps"]
            lower_p99 = ours["latency_ms"]["p99"] < theirs["latency_ms"]["p99"]
            lines.append(f"| {bench['model']}: tsforge >= 3x {TARGET_NAMES[other]} at concurrency {level}, lower P99 "
                         f"| {ratio:.2f}x, P99 {_f(ours['latency_ms']['p99'])} vs {_f(theirs['latency_ms']['p99'])} ms "
                         f"| {'yes' if ratio >= 3 and lower_p99 else 'no'} |")
    for tune in tunes:
        best, ceiling = tune.get("best"), tune.get("ceiling") or {}
        if best and ceiling.get("handler_items_per_s"):
            share = best["qps"] / ceiling["handler_items_per_s"]
            lines.append(f"| {tune['model']}: served >= 50% of the in-process ceiling at the tuned setting, `make tune` "
                         f"| {share:.0%} ({_f(best['qps'])} of {_f(ceiling['handler_items_per_s'])} items/s) "
                         f"| {'yes' if share >= 0.5 else 'no'} |")
    if len(lines) == 4:
        lines.append(f"| (no report has tsforge and a baseline at concurrency {level}) | - | - |")
    return "\n".join(lines) + "\n"


HEADER = """# Benchmarks

Generated by `python -m loadtest.render` from the JSON reports of `make bench` and `make tune`; do not
edit by hand, re-run those and render again. Each section names the run it comes from: its date, its
exact command and the machine. Numbers from different machines (or from a busy one) are not comparable.

Reproduce:

```bash
make archive MODELS="digits resnet18 minilm"
# this round (CPU: which precision and backend each archive serves with, and what that is worth):
make bench LEVELS=16 BENCH_ARGS="--matrix --compare main=OLD/resnet18.mar"   # OLD: an archive built from an earlier commit
make bench MODEL=digits LEVELS=16,64 DURATION=15 BENCH_ARGS=--matrix
make bench MODEL=minilm LEVELS=16,64 DURATION=15 BENCH_ARGS="--matrix --targets tsforge,ceiling"
# earlier rounds:
make tune MODEL=resnet18 P99_MS=400 BUDGET=420 TUNE_ARGS="--trial 8 --workers 1,2 --batch-sizes 8,16 --delays 5,20 --threads 1,2"
make tune MODEL=digits P99_MS=50 BUDGET=240 TUNE_ARGS="--trial 5 --workers 1,2 --batch-sizes 1,8,16 --delays 2,5 --threads 1,2"
make tune MODEL=digits P99_MS=50 BUDGET=240 TUNE_ARGS="--trial 15 --workers 2 --batch-sizes 8,16 --delays 1,2,5 --threads 1"
# (the second digits sweep re-measures the first one's leaders with longer trials: 5-s trials differ by up to
#  30 % from run to run on this machine. The best settings are in config/models/{resnet18,digits}.yaml;
#  `make archive` again after changing them)
make bench LEVELS=1,4,16                              # resnet18: reports/bench/resnet18/bench.{json,md,png}
make bench MODEL=digits LEVELS=1,4,16,64
make benchmarks-doc                                   # renders this file from those reports
```

How it is measured: a closed loop of N concurrent clients (`loadtest/loadgen.py`: asyncio, one kept-alive
HTTP/1.1 connection each, `loadtest/http1.py`), each sending the next request when its answer arrives,
over 32 real payloads whose every answer is checked against the archive's handler run in-process: only
correct answers count towards throughput. Every server gets 10 s of load before it is measured (the JVM
compiles TorchServe's hot paths over the first ~20 s of load). The server's CPU % and peak RSS are sampled
with psutil over its process tree (TorchServe's Java frontend and Python workers). The stage breakdown
comes from TorchServe's own counters and gauges and from the tsforge
handler's HandlerDecodeTime, HandlerInferenceTime, HandlerEncodeTime and HandlerBatchSize.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.render", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, nargs="*", default=[])
    parser.add_argument("--tune", type=Path, nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--status", default="", help="a note on where these numbers come from, shown at the top")
    parser.add_argument("--analysis", type=Path, default=ROOT / "docs" / "benchmarks-analysis.md",
                        help="hand-written reading of the numbers, included after the goals")
    parser.add_argument("--gpu", type=Path, default=ROOT / "docs" / "benchmarks-gpu.md",
                        help="the GPU section, written from `make bench-gpu` on a GPU host, included at the end")
    args = parser.parse_args(argv)
    benches = [json.loads(p.read_text()) for p in args.bench if p.is_file()]
    tunes = [json.loads(p.read_text()) for p in args.tune if p.is_file()]
    parts = [HEADER]
    if args.status:
        parts.append(f"> **Status:** {args.status}\n")
    if benches or tunes:
        parts.append(goals_markdown(benches, tunes))
    if args.analysis.is_file():
        parts.append(args.analysis.read_text())
    if benches:
        parts.append("## Side by side (`make bench`)\n")
        parts += [bench_markdown(b) for b in benches]
    if tunes:
        parts.append("## Tuned settings (`make tune`)\n")
        parts += [tune_markdown(t) for t in tunes]
    if len(parts) == 1 + bool(args.status):
        parts.append("No reports yet: run the commands above.\n")
    if args.gpu.is_file():
        parts.append(args.gpu.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(parts))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
