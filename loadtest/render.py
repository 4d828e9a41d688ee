"""Render the committed benchmark data (docs/data/*.json) as docs/benchmarks.md, its plots, the GPU page
docs/benchmarks-gpu.md (loadtest/render_gpu.py) and the measured parts of docs/scaling.md and docs/reliability.md
(loadtest/render_reliability.py). Nothing is read back out of markdown: every table names the JSON it comes from,
and the pages depend on that data alone (tests/test_render.py renders it afresh and compares).

    python -m loadtest.render                       # docs/data/ -> docs/benchmarks*.md, docs/scaling.md, ...
    python -m loadtest.render --data DIR --out PAGE.md --scaling SCALING.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import matrix, render_gpu, render_reliability
from loadtest.report import machine_line, replace_generated_block, shown
from loadtest.stock import declared_stock_handler, stock_name
from tsforge import extras
from tsforge.kube import capacity
from tsforge.project import ROOT

#: a report as rendered: where its JSON is (as the docs name it) and what it holds
Report = tuple[str, dict[str, Any]]

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


def _setting(setting: dict[str, Any]) -> str:
    workers, threads = setting["workers"], setting.get("threads")  # runs before threads were set recorded none
    per_worker = f", {threads} torch thread{'' if threads == 1 else 's'} each" if threads else ""
    return f"{workers} worker{'' if workers == 1 else 's'} x batch {setting['batch_size']}{per_worker}"


def stock_handler_of(result: dict[str, Any], row: dict[str, Any] | None = None) -> str | None:
    """The stock handler a report's stock rows ran: as the row or the report recorded it (`make bench` records it
    since it names baselines), else the one loadtest/stock.py maps the model to."""
    recorded = (row or {}).get("stock_handler") or result.get("stock_handler")
    if recorded:
        return str(recorded)
    return declared_stock_handler(result.get("model"))


def stock_label(result: dict[str, Any], row: dict[str, Any] | None = None) -> str:
    """"TorchServe stock handler `image_classifier`": the baseline named by the handler it ran."""
    handler = stock_handler_of(result, row)
    return TARGET_NAMES["stock"] + (f" {stock_name(handler)}" if handler else "")


def target_name(row: dict[str, Any], result: dict[str, Any] | None = None) -> str:
    if row["target"] == "stock":
        name, setting = stock_label(result or {"model": None}, row), row.get("setting")
        return f"{name}, best setting ({_setting(setting)})" if setting else name
    return TARGET_NAMES.get(row["target"], str(row["target"]))


def bench_markdown(result: dict[str, Any], source: str | None = None) -> str:
    config = result.get("model_config") or {}
    handler = config.get("handler") or {}
    lines = [
        f"### {result['model']}: {result['payloads']['count']} payloads "
        f"({', '.join(result['payloads']['kinds'])}, {result['payloads']['mean_bytes']} bytes on average)",
        "",
        *([f"Data: `{source}`  "] if source else []),
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
            f"| {target_name(row, result)} | {row['level']} | {_f(row['qps'])} "
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
    lines += [*stock_sweep_markdown(result), *matrix.markdown(result), "", *breakdown_markdown(result),
              *(f"- note: {n}" for n in result.get("notes", []))]
    return "\n".join(lines) + "\n"


def stock_sweep_markdown(result: dict[str, Any]) -> list[str]:
    """The stock handler's settings tried before its rows were measured, the best marked."""
    sweep = result.get("stock_sweep")
    if not sweep:
        return []
    lines = ["", f"{stock_label(result)} settings tried at concurrency {sweep['level']} ({sweep['duration_s']:g} s each after "
             f"{sweep['warmup_s']:g} s of load); the fastest serves the stock rows above:", "",
             "| workers x batch (torch threads each) | correct req/s | P99 ms | success |", "|---|---:|---:|---:|"]
    for entry in sweep["settings"]:
        name = f"{entry['workers']} x {entry['batch_size']}" + (f" ({entry['threads']})" if "threads" in entry else "")
        mark = " (best)" if f"{entry['workers']}x{entry['batch_size']}" == sweep["best"] else ""
        if "error" in entry:
            lines.append(f"| {name} | does not run: {entry['error'].splitlines()[-1][:80]} | - | - |")
        else:
            lines.append(f"| {name}{mark} | {_f(entry['qps'])} | {_f(entry['p99_ms'])} "
                         f"| {entry['success_rate']:.1%} |")
    return lines


COMPARED = (("tsforge", "tsforge handler on TorchServe (as archived)"),
            ("stock_best", "{stock} at its best setting"), ("flask", "Flask, per-request fp32"))


def compared_name(name: str, result: dict[str, Any], point: dict[str, Any]) -> str:
    """A side-by-side row's name; the stock baseline's names the handler it ran."""
    return name.format(stock=stock_label(result, point)) if "{stock}" in name else name


def comparison_markdown(report: Report) -> list[str]:
    """tsforge beside the stock handler at its best setting, Flask and the in-process ceiling, from one run."""
    source, result = report
    found = result.get("comparison")
    if not found or len(found) <= 2:
        return []
    lines = [f"### {result['model']} side by side at concurrency {found['level']} (one run)", "",
             f"Data: `{source}` (`comparison`); run {result['created']} on {machine_line(result['machine'])}", "",
             "| server | correct req/s | P50 ms | P99 ms | tsforge req/s vs this | tsforge P99 lower |",
             "|---|---:|---:|---:|---:|---|"]
    for key, name in COMPARED:
        point = found.get(key)
        if not point:
            continue
        name, setting = compared_name(name, result, point), point.get("setting")
        if setting:
            name += f" ({_setting(setting)})"
        ratio = "1.00x" if key == "tsforge" else _x(found.get(f"vs_{key}"))
        lower = "" if key == "tsforge" else ("yes" if found.get(f"p99_below_{key}") else "no")
        lines.append(f"| {name} | {_f(point['qps'])} | {_f(point['p50_ms'])} | {_f(point['p99_ms'])} | {ratio} "
                     f"| {lower} |")
    if found.get("ceiling_items_per_s"):
        lines.append(f"| in-process ceiling (decode + infer + encode, no server) | {_f(found['ceiling_items_per_s'])} "
                     f"items/s | | | tsforge serves {found['share_of_ceiling']:.0%} of it | |")
    return [*lines, ""]


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
    extras.require("matplotlib", "plots", f"the plot {path.name}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for target in dict.fromkeys(r["target"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["target"] == target]
        axes.plot([r["qps"] for r in rows], [r["latency_ms"]["p99"] for r in rows], marker="o",
                  label=stock_label(result) if target == "stock" else TARGET_NAMES.get(target, target))
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


def tune_markdown(result: dict[str, Any], source: str | None = None, top: int = 10) -> str:
    lines = [
        f"### tuning {result['model']}: P99 <= {result['p99_ms']:g} ms at concurrency {result['users']}",
        "",
        *([f"Data: `{source}`  "] if source else []),
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


#: the side-by-side goal: tsforge serves at least this many times each baseline, with a lower P99
GOAL_RATIO = 3.0


def _ceiling_goals(source: str, bench: dict[str, Any], level: int) -> list[str]:
    rows = {(r["target"], r["level"]): r for r in bench["rows"]}
    ceiling = (bench.get("ceiling") or {}).get("handler_items_per_s")
    lines = []
    for shown_level in sorted({level, max(bench.get("levels") or [level])}):
        served = rows.get(("tsforge", shown_level))
        if ceiling and served:
            share = served["qps"] / ceiling
            lines.append(f"| {bench['model']}: served >= 50% of the in-process ceiling at the archived (tuned) "
                         f"setting, `make bench` at concurrency {shown_level} | {share:.0%} ({_f(served['qps'])} of "
                         f"{_f(ceiling)} items/s) | {'yes' if share >= 0.5 else 'no'} | `{source}` |")
    return lines


def _baseline_goals(source: str, bench: dict[str, Any]) -> list[str]:
    found = bench.get("comparison") or {}
    lines = []
    for key, name in COMPARED[1:]:
        theirs = found.get(key)
        if not theirs:
            continue
        goal = f"{bench['model']}: tsforge >= {GOAL_RATIO:g}x {compared_name(name, bench, theirs)} at concurrency {found['level']}, lower P99"
        ratio = found.get(f"vs_{key}")
        if ratio is None:
            lines.append(f"| {goal} | the baseline gave no correct answer in the window | - | `{source}` |")
            continue
        lower = found.get(f"p99_below_{key}")
        lines.append(f"| {goal} | {ratio:.2f}x, P99 {_f(found['tsforge']['p99_ms'])} vs {_f(theirs['p99_ms'])} ms "
                     f"| {'yes' if ratio >= GOAL_RATIO and lower else 'no'} | `{source}` |")
    return lines


def goals_markdown(benches: list[Report], tunes: list[Report], level: int = 16) -> str:
    """The project's performance goals, checked against the committed data."""
    lines = ["## Goals", "", "| goal | measured | met | data |", "|---|---|---|---|"]
    for source, bench in benches:
        lines += _ceiling_goals(source, bench, level) + _baseline_goals(source, bench)
    for source, tune in tunes:
        best, ceiling = tune.get("best"), tune.get("ceiling") or {}
        if best and ceiling.get("handler_items_per_s"):
            share = best["qps"] / ceiling["handler_items_per_s"]
            lines.append(f"| {tune['model']}: served >= 50% of the in-process ceiling at the tuned setting, `make tune` "
                         f"| {share:.0%} ({_f(best['qps'])} of {_f(ceiling['handler_items_per_s'])} items/s) "
                         f"| {'yes' if share >= 0.5 else 'no'} | `{source}` |")
    if len(lines) == 4:
        lines.append(f"| (no committed report has tsforge at concurrency {level}) | - | - | - |")
    return "\n".join(lines) + "\n"


def front_cost_markdown(report: Report) -> str:
    from loadtest.front_cost import markdown

    source, result = report
    return (f"## The v2 front's cost (`make bench-front`)\n\nData: `{source}`; run {result['created']} on "
            f"{machine_line(result['machine'])}\n\n{markdown(result)}")


HEADER = """# Benchmarks

Generated by `make benchmarks-doc` (`python -m loadtest.render`) from the committed JSON in `docs/data/`, which
`make bench`, `make tune` and `make bench-front` write; do not edit by hand, re-run those and render again. Each
table names the JSON it comes from, and each run its date, its exact command and the machine (recorded at run
time). Numbers from different machines (or from a busy one) are not comparable.

Reproduce:

```bash
make archive MODELS="digits resnet18 minilm"
# this round (CPU: which precision and backend each archive serves with, and what that is worth):
make bench                                  # resnet18 at 1,4,16: tsforge, stock at its best setting, Flask, ceiling
make bench LEVELS=16 BENCH_NAME=resnet18-matrix BENCH_ARGS="--matrix --targets tsforge"
make bench MODEL=digits LEVELS=1,4,16,64 DURATION=15 BENCH_ARGS=--matrix
make bench MODEL=minilm LEVELS=16,64 DURATION=15 BENCH_ARGS="--matrix --targets tsforge,ceiling"
# earlier rounds:
make tune MODEL=resnet18 P99_MS=400 BUDGET=420 TUNE_ARGS="--trial 8 --workers 1,2 --batch-sizes 8,16 --delays 5,20 --threads 1,2"
make tune MODEL=digits P99_MS=50 BUDGET=240 TUNE_ARGS="--trial 5 --workers 1,2 --batch-sizes 1,8,16 --delays 2,5 --threads 1,2"
make tune MODEL=digits P99_MS=50 BUDGET=240 TUNE_ARGS="--trial 15 --workers 2 --batch-sizes 8,16 --delays 1,2,5 --threads 1"
# (the second digits sweep re-measures the first one's leaders with longer trials: 5-s trials differ by up to
#  30 % from run to run on this machine. The best settings are in config/models/{resnet18,digits}.yaml;
#  `make archive` again after changing them)
make benchmarks-doc                         # this file and docs/scaling.md from docs/data/*.json
```

How it is measured: a closed loop of N concurrent clients (`loadtest/loadgen.py`: asyncio, one kept-alive
HTTP/1.1 connection each, `loadtest/http1.py`), each sending the next request when its answer arrives,
over 32 real payloads whose every answer is checked against the archive's handler run in-process: only
correct answers count towards throughput. Every server gets 10 s of load before it is measured (the JVM
compiles TorchServe's hot paths over the first ~20 s of load). The stock handler is served at its best setting
on the same machine: 1 or 2 workers x batch 1 or 8, each worker given its share of the cores as torch threads
(OMP_NUM_THREADS: the stock handlers set none, and two workers each taking every core fight over them), are each
tried at the highest concurrency, and the fastest is measured at every level beside tsforge, Flask and the in-process ceiling, in the same run. The server's CPU % and peak RSS are sampled
with psutil over its process tree (TorchServe's Java frontend and Python workers). The stage breakdown
comes from TorchServe's own counters and gauges and from the tsforge
handler's HandlerDecodeTime, HandlerInferenceTime, HandlerEncodeTime and HandlerBatchSize.
"""


SCALING_BEGIN = ("<!-- BEGIN generated by `make benchmarks-doc` (loadtest/render.py) from docs/data/bench-*.json: "
                 "edit the data or the renderer, not this block -->")
SCALING_END = "<!-- END generated -->"
SCALING_LOADS = (100, 500, 1000, 10000)


def _sizings(benches: list[Report], data: Path) -> list[tuple[Report, capacity.Sizing]]:
    """Each model's sizing by tsforge.kube.capacity's rule, from the same files it reads for `make kserve`."""
    measured = capacity.measurements(ROOT, data)
    found = []
    for source, bench in benches:
        own = measured.get(bench["model"])
        if own is None or Path(own.source).name != Path(source).name:
            continue  # another run of the model (bench-NAME-matrix.json): not what replicas are sized from
        config = bench.get("model_config") or {}
        sizing = capacity.size(bench["model"], int(config.get("maxWorkers", 1)), int(config.get("batchSize", 1)),
                               measured)
        found.append(((source, bench), sizing))
    return found


def scaling_markdown(benches: list[Report], data: Path) -> str:
    """The measured part of docs/scaling.md: what one replica carries, and replicas for a few loads."""
    sized = _sizings(benches, data)
    if not sized:
        return (f"No committed `make bench` summary (`{shown(data)}/bench-NAME.json`) yet: every model gets the "
                "fallback described below until `make bench MODEL=NAME` and `make benchmarks-doc` are run.\n")
    lines = ["| model | target concurrency | capacity per replica | P99 there | CPU / memory per replica | data |",
             "|---|---:|---:|---:|---|---|"]
    for (source, _), s in sized:
        knee = s.measured.knee if s.measured else None
        lines.append(f"| {s.model} | {s.target_concurrency} | {s.capacity_qps:,.1f} req/s | "
                     f"{_f(knee.p99_ms if knee else None)} ms | {s.cpu} cores / {s.memory_mib} MiB | `{source}` |")
    lines += ["", "Measured on: " + "; ".join(f"{b['model']}: {machine_line(b['machine'])}" for (_, b), _ in sized),
              "", "| load | " + " | ".join(f"{s.model} replicas (cores)" for _, s in sized) + " |",
              "|---:|" + "---:|" * len(sized)]
    for load in SCALING_LOADS:
        cells = [f"{s.replicas_for(load)} ({(s.replicas_for(load) or 0) * s.cpu})" for _, s in sized]
        lines.append(f"| {load:,} req/s | " + " | ".join(cells) + " |")
    (_, first), sizing = sized[0]
    util = capacity.KNATIVE_TARGET_UTILIZATION
    lines += ["", f"For example {first['model']} at 1,000 req/s: 1000 / ({util:g} x {sizing.capacity_qps:,.1f}) = "
              f"{1000 / (util * (sizing.capacity_qps or 1)):.1f}, so {sizing.replicas_for(1000)} replicas. The clients "
              "sent " + ", ".join(f"{b['model']} payloads of {b['payloads']['mean_bytes']:,} bytes on average"
                                   for (_, b), _ in sized) + "."]
    return "\n".join(lines) + "\n"


def render_scaling(path: Path, benches: list[Report], data: Path) -> None:
    """Replace the generated block of docs/scaling.md; the prose around it stays as written."""
    replace_generated_block(path, SCALING_BEGIN, SCALING_END, scaling_markdown(benches, data))


def read_reports(paths: list[Path]) -> list[Report]:
    return [(shown(p), json.loads(p.read_text())) for p in sorted(paths) if p.is_file()]


def _plot_link(report: Report, page: Path, plots: Path | None = None) -> str:
    """The report's throughput-vs-P99 plot, written beside its JSON (or into `plots`), as the page links it."""
    source, bench = report
    json_path = Path(source) if Path(source).is_absolute() else ROOT / source
    plots = plots or json_path.parent
    plots.mkdir(parents=True, exist_ok=True)
    plot = bench_plot(bench, plots / json_path.with_suffix(".png").name)
    return f"![{bench['model']}: throughput vs P99]({os.path.relpath(plot, page.parent)})  \n*Plot of `{source}`.*\n"


def startup_markdown(report: Report) -> str:
    from loadtest.startup import markdown

    source, result = report
    return (f"## Worker start with `auto` (`make bench-startup`)\n\nData: `{source}`; run {result['machine']['date']} "
            f"on {machine_line(result['machine'])}. A model's configured workers start together: the first times the "
            "candidates and checks them on the held-out inputs while the others wait for its choice; a worker "
            "added later (a restart, a scale-up) reuses it.\n\n" + markdown(result))


def benchmarks_page(args: argparse.Namespace, benches: list[Report], tunes: list[Report],
                    fronts: list[Report], startups: Sequence[Report] = ()) -> str:
    parts = [HEADER]
    if args.status:
        parts.append(f"> **Status:** {args.status}\n")
    if benches or tunes:
        parts.append(goals_markdown(benches, tunes))
        parts += ["\n".join(lines) for lines in map(comparison_markdown, benches) if lines]
    if args.analysis.is_file():
        parts.append(args.analysis.read_text())
    if benches:
        parts.append("## Side by side (`make bench`)\n")
        parts += [bench_markdown(b, source) + "\n" + _plot_link((source, b), args.out, args.plots) for source, b in benches]
    if tunes:
        parts.append("## Tuned settings (`make tune`)\n")
        parts += [tune_markdown(t, source) for source, t in tunes]
    parts += [front_cost_markdown(f) for f in fronts]
    parts += [startup_markdown(r) for r in startups]
    if len(parts) == 1 + bool(args.status):
        parts.append("No committed data yet: run the commands above.\n")
    parts.append(render_gpu.page(args.data))
    return "\n".join(parts)


#: the note shown atop docs/benchmarks.md, kept with the data so that a render from DATA alone gives the same page
STATUS_FILE = "benchmarks-status.txt"


def status(data: Path, given: str) -> str:
    """The page's status note: `given` is stored in DATA/STATUS_FILE; without one, the stored note."""
    path = data / STATUS_FILE
    if given.strip():
        path.write_text(given.strip() + "\n")
    return path.read_text().strip() if path.is_file() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.render", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "docs" / "data",
                        help="the committed JSON: bench-*.json, tune-*.json, front-cost.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--scaling", type=Path, default=ROOT / "docs" / "scaling.md",
                        help="the page whose generated block gets the per-replica sizing")
    parser.add_argument("--reliability", type=Path, default=ROOT / "docs" / "reliability.md",
                        help="the page whose generated block gets DATA/reliability/*.json, soak.json, startup.json")
    parser.add_argument("--status", default="", help="a note on where these numbers come from, shown at the top: "
                        f"kept in DATA/{STATUS_FILE}, which later renders read (empty: keep the one there)")
    parser.add_argument("--analysis", type=Path, default=ROOT / "docs" / "benchmarks-analysis.md",
                        help="hand-written reading of the numbers, included after the goals")
    parser.add_argument("--gpu", type=Path, help="the GPU page, rendered from DATA/gpu-*.json and DATA/test-gpu.json "
                        "and included at the end of --out (default: benchmarks-gpu.md beside --out)")
    parser.add_argument("--plots", type=Path,
                        help="where the bench plots go (default: beside each JSON); the page links them from there")
    args = parser.parse_args(argv)
    args.gpu = args.gpu or args.out.with_name("benchmarks-gpu.md")
    args.status = status(args.data, args.status)
    benches = read_reports(list(args.data.glob("bench-*.json")))
    tunes = read_reports(list(args.data.glob("tune-*.json")))
    fronts = read_reports(list(args.data.glob("front-cost*.json")))
    startups = read_reports(list(args.data.glob("startup*.json")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(benchmarks_page(args, benches, tunes, fronts, startups))
    render_scaling(args.scaling, benches, args.data)
    render_reliability.render(args.reliability, args.data)
    render_gpu.render(args.gpu, args.data)
    print(f"wrote {shown(args.out)}, {shown(args.scaling)}, {shown(args.reliability)} and {shown(args.gpu)} from "
          f"{len(benches) + len(tunes) + len(fronts)} file(s) in {shown(args.data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
