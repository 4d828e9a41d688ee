"""`make bench`: one model, one payload set, four ways of serving it, several concurrency levels.

    python -m loadtest.bench --model resnet18 --levels 1,4,16 --duration 20

1. tsforge: the archive's handler on TorchServe (model_store/MODEL.mar as built)
2. stock:   TorchServe's own handler (image_classifier for image models) on the same TorchScript file, at
            its best setting here: each of 1 or 2 workers x batch 1 or 8 (each worker its share of the cores
            as torch threads) is served at the highest level for --stock-sweep-duration s, and the fastest is
            then measured at every level like the others
3. flask:   a plain Flask server, one fp32 forward pass per request (loadtest/flask_baseline.py)
4. ceiling: the archive's handler in this process, a batched loop, no server (decode+infer+encode), and
            the forward pass alone

Every answer is checked against the in-process reference; throughput counts correct answers only.
With --matrix, the archive is also served with each backend x precision x fusion pinned (loadtest/matrix.py)
at the highest level, beside the variant `auto` chose (read from the management API's model description).
Writes reports/bench/MODEL/bench.json (the raw report), bench.md (the table) and bench.png (throughput vs P99),
and the small summary that is committed, docs/data/bench-MODEL.json (--data): docs/benchmarks.md, docs/scaling.md
and the KServe sizing are made from it. Its `comparison` holds the side-by-side ratios at concurrency 16 (else the
highest level): tsforge against the stock handler at its best setting, against Flask, and the P99 of each.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from export.registry import get
from handlers.placement import cores_per_worker
from loadtest import matrix, report
from loadtest.inprocess import PLAIN_FP32, ceiling, prepared_cases, unpack
from loadtest.loadgen import load
from loadtest.monitor import MetricsScraper, monitored, worker_threads
from loadtest.payloads import Case
from loadtest.serving import selection, torchserve
from loadtest.stock import STOCK_HANDLERS, stock_handler
from tsforge import extras
from tsforge.project import ROOT
from tsforge.serving.server import free_port

#: stock handlers that answer a bare label as text, not JSON (pytorch/serve's Hugging Face example handler)
STOCK_BARE_LABEL = {"loadtest/stock_text_classifier.py"}
TARGETS = ("tsforge", "stock", "flask", "ceiling")
#: settings under which the archive's handler preprocesses as a stock handler does (its references): image_segmenter
#: scales the shorter side to 256 and answers for the 224 x 224 centre crop
STOCK_REFERENCE = {"image_segmenter": {"resize": 256, "crop": 224, "output_size": "model"}}
#: the shortest measurement of a stock handler whose answers take seconds: image_segmenter spends ~0.65 s of its
#: worker's time per image on one core (0.42 s in its postprocess, a 2.5 MB [224][224][class, p] list), so the 16
#: requests a cancelled warm-up leaves queued keep its worker busy for ~25 s before measured requests are served;
#: a window this long lets it show its steady rate (still a lower bound: that backlog is served, not counted)
STOCK_MIN_DURATION_S = {"image_segmenter": 60.0}
BENCH_BUILD = ROOT / "build" / "bench"


@dataclass(frozen=True)
class StockSetting:
    """How TorchServe serves the stock handler: its workers and batch size (the delay is the tsforge archive's, so
    both wait as long to fill a batch), each worker given its share of the cores as torch threads."""

    workers: int
    batch_size: int

    @property
    def threads(self) -> int:
        """Torch threads per worker. The stock handlers set none, so each worker would take every core and several
        workers would fight over them (OpenMP's waiting threads spin); a user running more than one sets
        OMP_NUM_THREADS, as TorchServe's performance guide says."""
        return cores_per_worker(self.workers)

    @property
    def env(self) -> dict[str, str]:
        return {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}

    @classmethod
    def parse(cls, text: str) -> StockSetting:
        workers, batch = text.lower().split("x")
        return cls(int(workers), int(batch))

    @property
    def name(self) -> str:
        return f"{self.workers}x{self.batch_size}"


#: 1 or 2 workers x batch 1 or 8: TorchServe's defaults (1 x 1) and what a user tuning the stock handler would try
STOCK_SETTINGS = "1x1,1x8,2x1,2x8"


def stock_archive(model: str, store: Path, setting: StockSetting = StockSetting(1, 1),
                  max_batch_delay: int = 5) -> Path | None:
    """MODEL.mar with TorchServe's stock handler around build/MODEL/MODEL.pt, served as `setting`; None when there
    is no stock handler."""
    stock = stock_handler(model)
    if stock is None:
        return None
    # TorchServe's stock handlers import captum in the worker: without it, the stock worker would never load
    extras.need("captum", "loadtest", f"TorchServe's stock handler {stock} (bench target stock)")
    export_dir = ROOT / "build" / model
    store.mkdir(parents=True, exist_ok=True)
    config = store / "model-config.yaml"
    config.write_text(yaml.safe_dump({"minWorkers": setting.workers, "maxWorkers": setting.workers,
                                      "batchSize": setting.batch_size, "maxBatchDelay": max_batch_delay,
                                      "responseTimeout": 300}))
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    command = [str(archiver), "--model-name", model, "--version", "stock",
               "--handler", str(ROOT / stock) if stock.endswith(".py") else stock,
               "--serialized-file", str(stock_model(model, stock, export_dir)), "--export-path", str(store),
               "--config-file", str(config), "--force"]
    labels = export_dir / "index_to_name.json"
    extra = [labels] if labels.is_file() else []
    if stock == STOCK_HANDLERS["text_classification_handler.py"]:
        extra += stock_text_files(model, store)
    if stock == "object_detector":  # an eager model file and a state dict, as TorchServe's detection examples
        command += ["--model-file", str(ROOT / "loadtest" / "stock_detector_model.py")]
    if extra:
        command += ["--extra-files", ",".join(map(str, extra))]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return store / f"{model}.mar"


def stock_model(model: str, stock: str, export_dir: Path) -> Path:
    """The model file the stock handler serves: the export itself; for image_segmenter, whose postprocess reads
    `output["out"]`, the same program and weights scripted to return {"out": logits}."""
    exported = export_dir / f"{model}.pt"
    if stock == STOCK_HANDLERS["text_classification_handler.py"]:  # the Hugging Face folder the export came from
        from export.hf_folder import FOLDERS

        return FOLDERS[model] / "model.safetensors"
    if stock == "object_detector":
        return stock_detector_weights(exported)
    if stock != "image_segmenter":
        return exported
    from export.models.segmentation import stock_model_file

    wrapped = BENCH_BUILD / "stock-model" / f"{model}.pt"
    wrapped.parent.mkdir(parents=True, exist_ok=True)
    stock_model_file(str(exported), str(wrapped))
    return wrapped


def stock_detector_weights(exported: Path) -> Path:
    """The scripted detector's weights as the state dict of loadtest/stock_detector_model.py (names under `model.`):
    a plain tensor dict that torch.load(weights_only=True) reads.

    What stock object_detector needed to serve the same weights: not the scripted export (its preprocess stacks
    images into one tensor, which a scripted detector refuses, and it reads a list of dicts where the scripted one
    returns (losses, detections)), but TorchServe examples' form: `--model-file` with the eager architecture and
    this state dict as the serialized file. Its threshold is fixed at 0.5 (the detector config's too), it takes
    the raw body only, and stacking fails for images of different sizes in one batch (batch > 1: a 503 for all)."""
    import torch
    import torchvision  # noqa: F401  (registers the ops the scripted program calls)

    program = torch.jit.load(str(exported), map_location="cpu")  # type: ignore[no-untyped-call]
    weights = BENCH_BUILD / "stock-model" / f"{exported.stem}.state_dict.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"model.{name}": value for name, value in program.state_dict().items()}, weights)
    return weights


def stock_text_files(model: str, store: Path) -> list[Path]:
    """What the example handler reads beside the weights: the folder's config and tokenizer, its setup_config.json."""
    from export.hf_folder import FOLDERS
    from loadtest.stock_text_classifier import setup_config

    folder = FOLDERS[model]
    setup = store / "setup_config.json"
    setup.write_text(json.dumps(setup_config()))
    names = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
    return [setup, *(folder / name for name in names if (folder / name).is_file())]


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
                   duration: float, warmup: float, described: dict[str, Any] | None = None,
                   env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows for each level; `described` receives the handler's description of how it runs the model; `env` is
    TorchServe's (and its workers')."""
    rows = []
    with torchserve([model], store=store, name=f"bench-{model}-{label}", env=env) as server:
        if described is not None:
            described.update(selection(server, model))
        url = f"{server.url('inference')}/predictions/{model}"
        load(cases, max(levels), warmup, url=url, warmup_s=0.0)  # the JVM's JIT, TorchScript profiling, oneDNN caches
        threads_seen = worker_threads(report.server_pid(server.run_dir))  # each worker's, as it runs
        for level in levels:
            summary = measure(cases, level, duration, url, report.server_pid(server.run_dir), single_process=False,
                              metrics_url=server.url("metrics"), model=model)
            rows.append({**summary, "target": label, "url": summary["target"], "level": level,
                         "worker_threads": threads_seen})
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


def run_stock(model: str, cases: list[Case], levels: list[int], duration: float, warmup: float,
              settings: list[StockSetting], sweep: tuple[float, float], delay: int) -> tuple[list[dict[str, Any]],
                                                                                        dict[str, Any] | None]:
    """The stock handler at its best setting here: each setting served at the highest level for sweep[0] s after
    sweep[1] s of load, the fastest then measured at every level. Rows (empty without a stock handler), sweep."""
    level, tried = max(levels), []
    floor = STOCK_MIN_DURATION_S.get(stock_handler(model) or "", 0.0)
    sweep, duration = (max(sweep[0], floor), sweep[1]), max(duration, floor)
    for setting in settings:
        store = BENCH_BUILD / "stock-store" / setting.name
        if stock_archive(model, store, setting, delay) is None:
            return [], None
        entry: dict[str, Any] = {"workers": setting.workers, "batch_size": setting.batch_size,
                                 "threads": setting.threads}
        try:
            row = run_torchserve(f"stock-{setting.name}", model, store, cases, [level], sweep[0], sweep[1],
                                 env=setting.env)[0]
            entry |= {"qps": row["qps"], "p99_ms": row["latency_ms"]["p99"], "success_rate": row["success_rate"],
                      "threads_seen": row["worker_threads"]}
        except Exception as exc:  # a setting that cannot start here is a finding, not the end of the bench
            entry["error"] = str(exc)[:300]
        tried.append(entry)
    measured = [t for t in tried if t.get("qps")]
    if not measured:
        raise RuntimeError(f"no stock setting served a correct answer: {tried}")
    best = max(measured, key=lambda t: t["qps"])
    chosen = StockSetting(best["workers"], best["batch_size"])
    rows = run_torchserve("stock", model, BENCH_BUILD / "stock-store" / chosen.name, cases, levels, duration, warmup,
                          env=chosen.env)
    for row in rows:
        row["setting"] = {"workers": chosen.workers, "batch_size": chosen.batch_size, "max_batch_delay": delay,
                          "threads": chosen.threads}
        row["stock_handler"] = stock_handler(model)
    return rows, {"level": level, "duration_s": sweep[0], "warmup_s": sweep[1], "settings": tried,
                  "best": chosen.name}


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """qps and P99 of each row relative to tsforge at the same concurrency."""
    base = {r["level"]: r for r in rows if r["target"] == "tsforge"}
    for row in rows:
        reference = base.get(row["level"])
        if reference and reference["qps"] and row["qps"]:
            row["qps_vs_tsforge"] = round(row["qps"] / reference["qps"], 3)
            row["p99_vs_tsforge"] = round(row["latency_ms"]["p99"] / reference["latency_ms"]["p99"], 3)
    return rows


#: the concurrency the project's side-by-side goals are set at (the highest level when a run skips it)
COMPARED_LEVEL = 16
#: baselines of the side-by-side comparison: their target in the rows, their key in `comparison`
BASELINES = {"stock": "stock_best", "flask": "flask"}


def _point(row: dict[str, Any]) -> dict[str, Any]:
    latency = row["latency_ms"]
    return {"qps": row["qps"], "p50_ms": latency["p50"], "p99_ms": latency["p99"],
            "success_rate": row["success_rate"]}


def comparison(rows: list[dict[str, Any]], levels: list[int],
               ceiling_result: dict[str, Any] | None) -> dict[str, Any] | None:
    """tsforge beside each baseline at one concurrency, from the same run: throughput ratios and P99s."""
    level = COMPARED_LEVEL if COMPARED_LEVEL in levels else max(levels)
    at = {r["target"]: r for r in rows if r["level"] == level}
    ours = at.get("tsforge")
    if ours is None:
        return None
    found: dict[str, Any] = {"level": level, "tsforge": _point(ours)}
    for target, key in BASELINES.items():
        theirs = at.get(target)
        if theirs is None:
            continue
        found[key] = {**_point(theirs), **{k: theirs[k] for k in ("setting", "stock_handler") if k in theirs}}
        found[f"vs_{key}"] = round(ours["qps"] / theirs["qps"], 2) if theirs["qps"] else None
        found[f"p99_below_{key}"] = ours["latency_ms"]["p99"] < theirs["latency_ms"]["p99"]
    ceiling_rate = (ceiling_result or {}).get("handler_items_per_s")
    if ceiling_rate:
        found["ceiling_items_per_s"] = ceiling_rate
        found["share_of_ceiling"] = round(ours["qps"] / ceiling_rate, 3)
    return found


def _compact_selection(described: dict[str, Any]) -> dict[str, Any]:
    """The handler's description of its choice, without what only a debugging session needs."""
    keys = ("variant", "backend", "precision", "fusion", "measured", "reason", "accuracy", "below_bound")
    kept: dict[str, Any] = {k: described[k] for k in keys if k in described}
    if "capabilities" in described:
        kept["capabilities"] = {k: v for k, v in described["capabilities"].items() if k in ("device", "flags")}
    kept["trials"] = [{**t, "error": str(t["error"])[:200] if t.get("error") else None}
                      for t in described.get("trials", [])]
    return kept


#: the committed summary's format: bump it when a field changes meaning (render.py and capacity.py read it)
SCHEMA = "tsforge.bench/1"
_CONFIG_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "handler")


def summary(result: dict[str, Any], raw: Path) -> dict[str, Any]:
    """The small JSON committed under docs/data/: what the docs and the KServe sizing are made from."""
    matrix_result = result["matrix"]
    return {
        "schema": SCHEMA,
        **{k: result[k] for k in ("model", "created", "command", "machine", "levels", "duration_s", "warmup_s",
                                  "payloads")},
        "model_config": {k: v for k, v in result["model_config"].items() if k in _CONFIG_KEYS},
        "stock_handler": stock_handler(result["model"]),
        "rows": [report.compact_row(r) for r in result["rows"]],
        "comparison": result["comparison"],
        "stock_sweep": result["stock_sweep"],
        "ceiling": result["ceiling"],
        "selection": _compact_selection(result["selection"]),
        "matrix": matrix_result and {**matrix_result, "rows": [{k: (str(v)[:200] if k == "error" else v)
                                                                for k, v in r.items()}
                                                               for r in matrix_result["rows"]]},
        "notes": result["notes"],
        "raw_report": report.shown(raw),
        "wall_s": result["wall_s"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--levels", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of load on each server before measuring (TorchServe's JVM takes ~20 s of load "
                             "to compile its hot paths)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"any of {', '.join(TARGETS)}")
    parser.add_argument("--stock-settings", default=STOCK_SETTINGS,
                        help="WORKERSxBATCH settings of the stock handler to try at the highest level; the best serves "
                             "the stock rows")
    parser.add_argument("--stock-sweep-duration", type=float, default=8.0,
                        help="measured seconds per stock setting in the sweep")
    parser.add_argument("--stock-sweep-warmup", type=float, default=10.0,
                        help="seconds of load on each stock setting before its sweep measurement")
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL=FILE.mar",
                        help="also serve another build of the archive (e.g. one from an earlier commit) as LABEL")
    parser.add_argument("--matrix", action="store_true",
                        help="also serve each backend x precision x fusion pinned, at the highest level")
    parser.add_argument("--payload-count", type=int, default=32)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--out", type=Path, help="the raw report's folder; default: reports/bench/MODEL")
    parser.add_argument("--data", type=Path,
                        help="the small summary to commit (make bench: docs/data/bench-NAME.json); default: beside "
                             "the raw report, so test and trial runs never touch docs/data")
    args = parser.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.stock_settings = [StockSetting.parse(x) for x in args.stock_settings.split(",") if x.strip()]
    args.out = args.out or ROOT / "reports" / "bench" / args.model
    args.data = args.data or args.out / f"bench-{args.out.name}.json"
    return args


def run_compare(args: argparse.Namespace, mar: Path) -> list[dict[str, Any]]:
    rows = []
    for label, other in (c.split("=", 1) for c in args.compare):
        store = BENCH_BUILD / "compare" / label
        store.mkdir(parents=True, exist_ok=True)
        (store / f"{args.model}.mar").write_bytes(Path(other).read_bytes())
        other_cases = [c for c in prepared_cases(args.model, mar, args.payload_count,
                                                 handler_overrides=served_as(store / f"{args.model}.mar"))
                       if c.raw]
        rows += run_torchserve(label, args.model, store, other_cases, args.levels, args.duration, args.warmup)
    return rows


def run_ceiling(mar: Path, cases: list[Case], batch: int, duration: float) -> dict[str, Any]:
    # The best of one torch thread and one per core: which wins depends on the model and on what else runs.
    candidates = [ceiling(mar, cases, batch, duration / 2, threads) for threads in sorted({1, os.cpu_count() or 1})]
    found = asdict(max(candidates, key=lambda c: c.handler_items_per_s))
    print(f"  ceiling  batch {batch}: handler {found['handler_items_per_s']} items/s, "
          f"model alone {found['model_items_per_s']} items/s", flush=True)
    return found


def run_all(args: argparse.Namespace, mar: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Every target of the run, one after the other on this machine; the raw report's fields."""
    # The extras the run needs, before any of it runs (one line naming the extra, not a failure at the end).
    extras.need("matplotlib", "plots", "the plot bench.png")
    if "flask" in args.targets:
        extras.need("flask", "loadtest", "the Flask baseline (bench target flask)")
    stock = stock_handler(args.model)
    if "stock" in args.targets and stock:
        extras.need("captum", "loadtest", f"TorchServe's stock handler {stock} (bench target stock)")
    # Raw bodies only: what every server accepts alike (stock handlers take no JSON envelopes).
    cases = [c for c in prepared_cases(args.model, mar, args.payload_count) if c.raw]
    # The stock handler and Flask run the plain fp32 export: their answers are checked against that.
    fp32_cases = [c for c in prepared_cases(args.model, mar, args.payload_count, handler_overrides=PLAIN_FP32)
                  if c.raw]
    stock_cases = fp32_cases if stock not in STOCK_REFERENCE else [
        c for c in prepared_cases(args.model, mar, args.payload_count,
                                  handler_overrides={**PLAIN_FP32, **STOCK_REFERENCE[stock]}) if c.raw]
    if stock in STOCK_BARE_LABEL:
        for case in stock_cases:
            case.expect["bare_label"] = True
    found: dict[str, Any] = {"rows": [], "notes": [], "selection": {}, "matrix": None, "stock_sweep": None,
                             "ceiling": None, "cases": cases}
    print(f"bench {args.model}: {len(cases)} payloads, levels {args.levels}, {args.duration:g} s each", flush=True)
    if "tsforge" in args.targets:
        found["rows"] += run_torchserve("tsforge", args.model, args.store, cases, args.levels, args.duration,
                                        args.warmup, found["selection"])
    found["rows"] += run_compare(args, mar)
    if args.matrix:
        # as much load before its measurement as the tsforge row had before its highest level (the JVM's JIT)
        settle = args.warmup + args.duration * (len(args.levels) - 1)
        found["matrix"] = run_matrix(args.model, mar, args.payload_count, max(args.levels), args.duration, settle)
    if "stock" in args.targets:
        rows, found["stock_sweep"] = run_stock(args.model, stock_cases, args.levels, args.duration, args.warmup,
                                               args.stock_settings,
                                               (args.stock_sweep_duration, args.stock_sweep_warmup),
                                               int(config.get("maxBatchDelay", 5)))
        found["rows"] += rows
        if found["stock_sweep"] is None:
            found["notes"].append(f"stock: TorchServe has no stock handler for {get(args.model).handler}")
    if "flask" in args.targets:
        found["rows"] += run_flask(args.model, mar, fp32_cases, args.levels, args.duration, args.warmup)
    if "ceiling" in args.targets:
        found["ceiling"] = run_ceiling(mar, cases, int(config.get("batchSize", 16)), args.duration)
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    BENCH_BUILD.mkdir(parents=True, exist_ok=True)
    mar = args.store / f"{args.model}.mar"
    config = yaml.safe_load((unpack(mar) / "model-config.yaml").read_text()) or {}
    started = time.time()
    found = run_all(args, mar, config)
    cases, rows = found.pop("cases"), with_ratios(found.pop("rows"))
    result = {
        "model": args.model,
        "archive": report.shown(mar),
        "model_config": dict(config),
        "levels": args.levels,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "payloads": {"count": len(cases), "kinds": sorted({c.content_type for c in cases}),
                     "mean_bytes": round(sum(len(c.body) for c in cases) / max(1, len(cases)))},
        "command": "python -m loadtest.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "rows": rows,
        "comparison": comparison(rows, args.levels, found["ceiling"]),
        **found,
        "machine": report.machine(),
        "wall_s": round(time.time() - started, 1),
        "created": report.now(),
    }
    raw = args.out / "bench.json"
    raw.write_text(json.dumps(result, indent=2) + "\n")
    data = summary(result, raw)
    report.write_data(data, args.data)
    from loadtest.render import bench_markdown, bench_plot

    (args.out / "bench.md").write_text(bench_markdown(data, report.shown(args.data)))
    bench_plot(data, args.out / "bench.png")
    print(bench_markdown(data, report.shown(args.data)))
    print(f"reports: {args.out}; committed summary: {report.shown(args.data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
