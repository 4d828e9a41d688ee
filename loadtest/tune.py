"""`make tune`: find the serving setting with the most throughput under a P99 latency bound.

    python -m loadtest.tune --model digits --p99-ms 50 --budget 300 [--apply]

Sweeps workers x batchSize x maxBatchDelay x torch threads per worker (the handler's `threads` key)
with short closed-loop runs at a fixed concurrency, in the spirit of Triton's Model Analyzer. Each
setting is packaged as its own archive (TorchServe reads these from the archive's model-config.yaml)
and registered on one running TorchServe, replacing the previous one. The grid is tried in a fixed
shuffled order, the archive's current setting first, until the time budget runs out.

Writes reports/tune/MODEL/: tune.json, tune.md (ranked table), frontier.png, and model-config.yaml
with the best setting; `--apply` also writes that setting into config/models/MODEL.yaml.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from handlers.base import default_threads
from loadtest import report
from loadtest.inprocess import ceiling, prepared_cases
from loadtest.loadgen import load
from loadtest.monitor import monitored
from loadtest.payloads import Case
from loadtest.serving import torchserve
from tsforge import extras
from tsforge.packaging import archive
from tsforge.project import ROOT
from tsforge.serving.server import TorchServe

TUNE_BUILD = ROOT / "build" / "tune"


@dataclass(frozen=True)
class Setting:
    workers: int
    batch_size: int
    max_batch_delay: int
    threads: int

    def apply(self, config: dict[str, Any]) -> dict[str, Any]:
        updated = {**config, "minWorkers": self.workers, "maxWorkers": self.workers, "batchSize": self.batch_size,
                   "maxBatchDelay": self.max_batch_delay}
        updated["handler"] = {**(config.get("handler") or {}), "threads": self.threads}
        return updated


def grid(workers: list[int], batch_sizes: list[int], delays: list[int], threads: list[int],
         current: Setting | None, seed: int = 0) -> list[Setting]:
    settings = [Setting(*values) for values in itertools.product(workers, batch_sizes, delays, threads)]
    random.Random(seed).shuffle(settings)
    if current is not None:
        settings = [current, *(s for s in settings if s != current)]
    return settings


def current_setting(config: dict[str, Any]) -> Setting:
    workers = int(config.get("maxWorkers") or 1)
    threads = int((config.get("handler") or {}).get("threads") or default_threads(workers))
    return Setting(workers, int(config.get("batchSize") or 1), int(config.get("maxBatchDelay") or 100), threads)


def package(model: str, setting: Setting, base: dict[str, Any], store: Path, index: int) -> str:
    """An archive with this setting, built in a private build folder; returns its file name."""
    build_dir = TUNE_BUILD / "build"
    export_dir = build_dir / model
    export_dir.mkdir(parents=True, exist_ok=True)
    for source in (ROOT / "build" / model).iterdir():
        if source.is_file() and not (export_dir / source.name).exists():
            (export_dir / source.name).symlink_to(source)
    config_file = TUNE_BUILD / f"{model}-{index}.yaml"
    config_file.write_text(yaml.safe_dump(setting.apply(base), sort_keys=False))
    name = f"{model}-tune{index}"
    plan = archive.plan(model, build_dir=build_dir, store=store, config_file=config_file, archive_name=name)
    archive.build(plan)
    return f"{name}.mar"


def register(server: TorchServe, model: str, mar_name: str, workers: int) -> None:
    management = server.url("management")
    headers = server.auth("management")
    requests.delete(f"{management}/models/{model}", headers=headers, timeout=60)
    response = requests.post(f"{management}/models", headers=headers, timeout=300,
                             params={"url": mar_name, "initial_workers": str(workers), "synchronous": "true"})
    if response.status_code != 200:
        raise RuntimeError(f"registering {mar_name} failed: HTTP {response.status_code} {response.text[:300]}")
    server.wait_ready([model], timeout=300)


def run_trial(server: TorchServe, model: str, cases: list[Case], setting: Setting, users: int, seconds: float,
              p99_ms: float) -> dict[str, Any]:
    url = f"{server.url('inference')}/predictions/{model}"
    load(cases, users, 1.0, url=url, warmup_s=0.0)
    with monitored(report.server_pid(server.run_dir)) as usage:
        result = load(cases, users, seconds, url=url, warmup_s=0.0)
    latency = report.latency_stats(result.latency_ms)
    done = len(result.latency_ms)
    success = (done - result.failed) / done if done else 0.0
    qps = (done - result.failed) / result.elapsed_s if result.elapsed_s else 0.0
    return {"setting": asdict(setting), "qps": round(qps, 2), "latency_ms": latency, "success_rate": round(success, 4),
            "requests": done, "server": usage, "feasible": bool(done and latency["p99"] <= p99_ms and success >= 0.999)}


def summary(result: dict[str, Any], raw: Path) -> dict[str, Any]:
    """The small JSON committed under docs/data/ (docs/benchmarks.md's tuning tables are rendered from it)."""
    def compact(trial: dict[str, Any] | None) -> dict[str, Any] | None:
        return trial and {**report.compact_row(trial), "setting": trial["setting"], "feasible": trial["feasible"]}

    return {"schema": "tsforge.tune/1", **{k: v for k, v in result.items() if k not in ("trials", "best")},
            "trials": [compact(t) for t in result["trials"]], "best": compact(result["best"]),
            "raw_report": report.shown(raw)}


def ranked(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(trials, key=lambda t: (not t["feasible"], -t["qps"] if t["feasible"] else t["latency_ms"]["p99"]))


def apply_to_config(path: Path, setting: Setting) -> None:
    """Write the setting into a model config in place, keeping its comments."""
    text = path.read_text()
    for key, value in (("minWorkers", setting.workers), ("maxWorkers", setting.workers),
                       ("batchSize", setting.batch_size), ("maxBatchDelay", setting.max_batch_delay)):
        pattern = re.compile(rf"^{key}:[ \t]*[^#\n]*?(?=[ \t]*(#|$))", re.MULTILINE)
        text, count = pattern.subn(f"{key}: {value}", text)
        if not count:
            text = f"{key}: {value}\n" + text
    threads = re.compile(r"^([ \t]+)#?[ \t]*threads:[ \t]*[^#\n]*?(?=[ \t]*(#|$))", re.MULTILINE)
    text, count = threads.subn(lambda m: f"{m[1]}threads: {setting.threads}", text, count=1)
    if not count:
        text = re.sub(r"^handler:[ \t]*\n", f"handler:\n  threads: {setting.threads}\n", text, flags=re.MULTILINE) \
            if re.search(r"^handler:", text, re.MULTILINE) else text + f"handler:\n  threads: {setting.threads}\n"
    path.write_text(text)


def frontier_plot(trials: list[dict[str, Any]], p99_ms: float, path: Path, title: str) -> Path:
    extras.require("matplotlib", "plots", f"the plot {path.name}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for feasible, color in ((True, "tab:green"), (False, "tab:grey")):
        chosen = [t for t in trials if t["feasible"] == feasible]
        axes.scatter([t["qps"] for t in chosen], [t["latency_ms"]["p99"] for t in chosen], color=color,
                     label="meets the bound" if feasible else "misses it", s=18)
    frontier, best_p99 = [], float("inf")
    for trial in sorted(trials, key=lambda t: -t["qps"]):  # Pareto: no other has more qps and lower P99
        if trial["latency_ms"]["p99"] < best_p99:
            frontier.append(trial)
            best_p99 = trial["latency_ms"]["p99"]
    axes.plot([t["qps"] for t in frontier], [t["latency_ms"]["p99"] for t in frontier], color="tab:blue", marker="o",
              label="frontier")
    for trial in frontier:
        s = trial["setting"]
        axes.annotate(f"w{s['workers']} b{s['batch_size']} d{s['max_batch_delay']} t{s['threads']}",
                      (trial["qps"], trial["latency_ms"]["p99"]), fontsize=7, textcoords="offset points", xytext=(4, 4))
    axes.axhline(p99_ms, color="tab:red", linestyle="--", label=f"P99 bound {p99_ms:g} ms")
    axes.set_xlabel("correct requests/s")
    axes.set_ylabel("P99 latency (ms)")
    axes.set_yscale("log")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--p99-ms", type=float, required=True, help="P99 latency bound in milliseconds")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for the whole sweep")
    parser.add_argument("--trial", type=float, default=5.0, help="measured seconds per setting")
    parser.add_argument("--users", type=int, default=16, help="concurrency of every trial")
    parser.add_argument("--warmup", type=float, default=20.0,
                        help="seconds of load before the first trial: TorchServe's JVM needs ~20 s of load to compile "
                             "its hot paths, and a cold frontend would handicap whichever setting comes first")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--batch-sizes", default="1,4,8,16,32")
    parser.add_argument("--delays", default="1,5,10,20", help="maxBatchDelay values (ms)")
    parser.add_argument("--threads", default="1,2", help="torch threads per worker")
    parser.add_argument("--apply", action="store_true",
                        help="also write the best setting into config/models/MODEL.yaml")
    parser.add_argument("--out", type=Path, help="the raw report's folder; default: reports/tune/MODEL")
    parser.add_argument("--data", type=Path,
                        help="the small summary to commit (make tune: docs/data/tune-NAME.json); default: beside "
                             "the raw report")
    return parser.parse_args(argv)


def run_trials(args: argparse.Namespace, cases: list[Case], settings: list[Setting], base: dict[str, Any],
               store: Path, deadline: float) -> list[dict[str, Any]]:
    """Each setting packaged, registered and loaded in turn on one server, until the next would pass `deadline`
    (time.monotonic()); the trials measured."""
    trials: list[dict[str, Any]] = []
    trial_cost = args.trial + 4.0  # packaging, registration and warm-up come on top of the measured time
    with torchserve([], store=store, name=f"tune-{args.model}", overrides={"load_models": ""}) as server:
        for index, setting in enumerate(settings):
            if time.monotonic() + trial_cost > deadline:
                break
            step = time.monotonic()
            register(server, args.model, package(args.model, setting, base, store, index), setting.workers)
            if index == 0 and args.warmup > 0:  # once: the frontend's JIT outlives re-registrations
                load(cases, args.users, args.warmup, url=f"{server.url('inference')}/predictions/{args.model}",
                     warmup_s=0.0)
                step += args.warmup  # a cost paid once, not per trial
            trial = run_trial(server, args.model, cases, setting, args.users, args.trial, args.p99_ms)
            trials.append(trial)
            trial_cost = max(trial_cost, time.monotonic() - step)
            (store / f"{args.model}-tune{index}.mar").unlink(missing_ok=True)
            print(f"  [{index + 1}/{len(settings)}] {setting}: {trial['qps']:.1f} req/s, "
                  f"P99 {trial['latency_ms']['p99']:.1f} ms, ok {trial['success_rate']:.1%}"
                  f"{'' if trial['feasible'] else '  (misses the bound)'}", flush=True)
    return trials


def write_best(args: argparse.Namespace, best: dict[str, Any] | None, base: dict[str, Any], config_path: Path,
               written: Path) -> None:
    """The best setting as a model-config.yaml beside the report (and into config/models/ with --apply)."""
    if not best:
        return
    best_setting = Setting(**best["setting"])
    header = (f"# Tuned by `make tune` for P99 <= {args.p99_ms:g} ms at {args.users} users: "
              f"{best['qps']} req/s, P99 {best['latency_ms']['p99']} ms.\n")
    written.write_text(header + yaml.safe_dump(best_setting.apply(base), sort_keys=False))
    if args.apply:
        apply_to_config(config_path, best_setting)
        print(f"applied to {config_path.relative_to(ROOT)}")


def write_reports(args: argparse.Namespace, result: dict[str, Any], out: Path) -> None:
    """tune.json, the committed summary, tune.md and the frontier plot."""
    (out / "tune.json").write_text(json.dumps(result, indent=2) + "\n")
    data = args.data or out / f"tune-{out.name}.json"
    report.write_data(summary(result, out / "tune.json"), data)
    from loadtest.render import tune_markdown

    markdown = tune_markdown(result, report.shown(data))
    (out / "tune.md").write_text(markdown)
    frontier_plot(result["trials"], args.p99_ms, out / "frontier.png",
                  f"{args.model}: throughput vs P99, {args.users} users")
    print(markdown)
    print(f"reports: {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out = args.out or ROOT / "reports" / "tune" / args.model
    out.mkdir(parents=True, exist_ok=True)
    config_path = ROOT / "config" / "models" / f"{args.model}.yaml"
    base = yaml.safe_load(config_path.read_text()) or {}
    store = TUNE_BUILD / "store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    mar = ROOT / "model_store" / f"{args.model}.mar"
    cases = prepared_cases(args.model, mar)
    settings = grid(ints(args.workers), ints(args.batch_sizes), ints(args.delays), ints(args.threads),
                    current_setting(base))
    limit = max(1.0, args.trial / 2)
    ceiling_threads = sorted({1, *ints(args.threads)})
    ceiling_cost = 2 * limit * len(ceiling_threads) + 5.0  # measured after the trials, within the budget
    print(f"tune {args.model}: {len(settings)} settings, P99 <= {args.p99_ms:g} ms at {args.users} users, "
          f"budget {args.budget:g} s", flush=True)
    order = ranked(run_trials(args, cases, settings, base, store, started + args.budget - ceiling_cost))
    best = order[0] if order and order[0]["feasible"] else None
    # The ceiling at the best setting's batch size, measured once no server runs (as `make bench` does).
    batch = best["setting"]["batch_size"] if best else max(ints(args.batch_sizes))
    in_process = max((ceiling(mar, cases, batch, limit, t) for t in ceiling_threads),
                     key=lambda c: c.handler_items_per_s)
    written = out / "model-config.yaml"
    write_best(args, best, base, config_path, written)
    result = {
        "model": args.model, "p99_ms": args.p99_ms, "users": args.users, "trial_s": args.trial,
        "warmup_s": args.warmup,
        "grid_size": len(settings), "trials": order, "best": best,
        "written": report.shown(written) if best else None,
        "ceiling": asdict(in_process),
        "command": "python -m loadtest.tune " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": report.machine(), "wall_s": round(time.monotonic() - started, 1),
        "created": report.now(),
    }
    write_reports(args, result, out)
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
