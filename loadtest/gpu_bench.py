"""`make bench-gpu`: an image or sentence-embedding model on one GPU, from a clean tree, in one command.

    python -m loadtest.gpu_bench --levels 16,64,256 --duration 15 [--bundle ts.txz] [--wheels DIR] [--photos DIR]

1. set-up: TorchServe from a tarball of its unpacked wheels and a Java runtime (`--bundle`; a `jre/` folder
   in it becomes JAVA_HOME), pure-Python wheels installed without an index (`--wheels`), the two sample photos
   as files where scikit-learn is missing (`--photos`, read by export/models/resnet.py);
2. export (TorchScript only: no int8/ONNX variants, which a GPU does not serve) and archive the model here,
   so `tsforge.packaging.archive` packages the config's `gpu:` settings when CUDA is present;
3. payloads: crops and mirror images of the two photos as raw JPEG bodies, with reference answers from the
   archive's handler in this process on the GPU; the same handler on the CPU in fp32 gives the parity
   figures (label agreement, largest change of a top-1 probability);
4. the in-process ceilings on the GPU: the model alone, the batched decode alone, the whole handler;
5. tsforge and TorchServe's stock handler (same TorchScript file) served side by side at each concurrency,
   load from `--clients` processes (loadtest/loadgen.py over loadtest/http1.py), with the client's CPU, the
   server's CPU (frontend and workers), GPU utilisation and memory (nvidia-smi) sampled, and each worker's
   GPU memory at the start and the end of the run.

Writes OUT/gpu-bench.json, gpu-bench.md and gpu-bench.png. Without a GPU every step still runs (on the CPU),
which is how the test suite keeps this script working.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from loadtest.loadgen import LoadResult
from loadtest.payloads import Case

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "gpu-bench"
TARGETS = ("tsforge", "stock", "ceiling")
#: TorchServe's stock handler as the issue measured it: 4 workers, batches of 32, 10 ms
STOCK_CONFIG = {"minWorkers": 4, "maxWorkers": 4, "batchSize": 32, "maxBatchDelay": 10, "responseTimeout": 300}


# ---- 1. set-up ---------------------------------------------------------------------------------

def setup(bundle: Path | None, wheels: Path | None, photos: Path | None) -> list[str]:
    """Make TorchServe, the wheels and the photos usable by this process and every process it starts."""
    notes = []
    paths = []
    if bundle is not None:
        target = BUILD / "bundle"
        stamp = target / ".from"
        if not stamp.is_file() or stamp.read_text() != f"{bundle.resolve()}:{bundle.stat().st_size}":
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            with tarfile.open(bundle) as archive:
                archive.extractall(target, filter="tar")
            stamp.write_text(f"{bundle.resolve()}:{bundle.stat().st_size}")
        paths.append(target)
        if (target / "jre" / "bin" / "java").is_file():
            os.environ["JAVA_HOME"] = str(target / "jre")
            os.environ["PATH"] = f"{target / 'jre' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        notes.append(f"TorchServe from {bundle.name}")
    if wheels is not None:
        site = BUILD / "site"
        files = sorted(str(w) for w in wheels.glob("*.whl"))
        if files:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade",
                            "--target", str(site), *files], check=True)
            paths.append(site)
            notes.append(f"wheels: {', '.join(Path(f).name.split('-')[0] for f in files)}")
    for path in reversed(paths):
        sys.path.insert(0, str(path))
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    pythonpath = [str(p) for p in paths] + [str(ROOT)] + inherited
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(pythonpath))
    if photos is not None:
        from export.models.resnet import PHOTOS_ENV

        os.environ[PHOTOS_ENV] = str(photos.resolve())
        notes.append("sample photos from files")
    return notes


# ---- 2. export and archive ---------------------------------------------------------------------

def export_and_archive(model: str, model_name: str | None, handler: str | None, config: Path | None,
                       build_dir: Path, store: Path) -> tuple[Path, dict[str, Any]]:
    """The archive, exported (TorchScript only) unless `build_dir` already holds the export."""
    from export.exporter import export_model
    from export.registry import get
    from tsforge.packaging import archive

    spec = get(model)
    export_dir = build_dir / model
    started = time.perf_counter()
    if not (export_dir / "export.json").is_file():
        spec = dataclasses.replace(spec, variants=())
        export_model(spec, export_dir)
    exported = time.perf_counter()
    plan = archive.plan(model, build_dir=build_dir, store=store, config_file=config, model_name=model_name,
                        handler=handler)
    mar = archive.build(plan)
    return mar, {"export_s": round(exported - started, 1), "archive_s": round(time.perf_counter() - exported, 1)}


def stock_archive(model: str, export_dir: Path, store: Path) -> Path:
    """MODEL.mar with TorchServe's `image_classifier` around the same TorchScript file."""
    import yaml

    store.mkdir(parents=True, exist_ok=True)
    config = BUILD / "stock-config.yaml"
    config.write_text(yaml.safe_dump(STOCK_CONFIG))
    script = Path(sys.executable).with_name("torch-model-archiver")
    archiver = [str(script)] if script.is_file() else [sys.executable, "-m", "model_archiver.model_packaging"]
    command = [*archiver, "--model-name", model, "--version", "stock", "--handler", "image_classifier",
               "--serialized-file", str(export_dir / f"{model}.pt"), "--export-path", str(store),
               "--config-file", str(config), "--force"]
    labels = export_dir / "index_to_name.json"
    if labels.is_file():
        command += ["--extra-files", str(labels)]
    subprocess.run(command, check=True)
    return store / f"{model}.mar"


# ---- 3. payloads and references ----------------------------------------------------------------

def photo_jpegs(count: int, seed: int = 0) -> list[Case]:
    """Crops and mirror images of the two sample photos, 640 pixels wide, as raw JPEG bodies (quality 80-95)."""
    from PIL import Image

    from export.models.resnet import sample_photos
    from loadtest.payloads import jpeg

    photos = [Image.fromarray(p) for p in sample_photos().values()]
    rng = random.Random(seed)
    cases = []
    for n in range(count):
        photo = photos[n % len(photos)]
        scale = rng.uniform(0.55, 1.0)
        crop_w, crop_h = int(photo.width * scale), int(photo.height * scale * rng.uniform(0.8, 1.0))
        left, top = rng.randint(0, photo.width - crop_w), rng.randint(0, photo.height - crop_h)
        image = photo.crop((left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.resize((640, round(640 * image.height / image.width)), Image.Resampling.BICUBIC)
        cases.append(Case(f"photo{n % len(photos)}-{n}", jpeg(image, rng.choice((80, 90, 95))), "image/jpeg"))
    return cases


def local_handler(mar: Path, gpu: bool, overrides: dict[str, Any] | None = None,
                  batch_size: int | None = None) -> Any:
    """The archive's handler in this process, as a TorchServe worker on GPU 0 (gpu=True) or the CPU runs it;
    `batch_size` replaces the archive's (the warm-up runs every batch size up to it)."""
    from ts.context import Context

    from loadtest.inprocess import LocalHandler

    class OnDevice(LocalHandler):
        def context(self, batch: int) -> Context:
            context = super().context(batch)
            if gpu:
                context.system_properties["gpu_id"] = 0
            config = dict(context.model_yaml_config or {})
            if batch_size is not None:
                config["batchSize"] = batch_size
            if overrides and isinstance(config.get("gpu"), dict):  # the gpu section must not undo them on CUDA
                config["gpu"] = {**config["gpu"], "handler": {**(config["gpu"].get("handler") or {}), **overrides}}
            context.model_yaml_config = config
            return context

    return OnDevice.load(mar, handler_overrides=overrides)


def references(local: Any, cases: list[Case]) -> tuple[list[Case], list[Any]]:
    """Cases with the answers `local` gives (dropping those too close to call), and every raw answer."""
    from loadtest.payloads import expectation

    answers = [json.loads(body) if status == 200 else None for status, body in local.handle(cases)]
    kept = []
    for case, answer in zip(cases, answers, strict=True):
        expect = expectation(answer) if answer is not None else None
        if expect is not None:
            kept.append(Case(case.name, case.body, case.content_type, expect))
    return kept, answers


def embedding_parity(gpu_answers: list[Any], cpu_answers: list[Any]) -> dict[str, Any]:
    """How far the GPU's sentence embeddings are from the CPU's fp32 ones (cosine similarity)."""
    import numpy as np

    from loadtest.payloads import vector

    cosines = []
    for g, c in zip(gpu_answers, cpu_answers, strict=True):
        a, b = vector(g), vector(c)
        if a is not None and b is not None:
            x, y = np.asarray(a), np.asarray(b)
            cosines.append(float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-12)))
    return {"cases": len(cosines), "min_cosine": round(min(cosines), 6)} if cosines else {}


def parity(gpu_answers: list[Any], cpu_answers: list[Any]) -> dict[str, Any]:
    """How the GPU path's answers differ from the CPU path's (fp32, Pillow) on the same bodies."""
    from loadtest.payloads import top_label, top_probability

    pairs = [(g, c) for g, c in zip(gpu_answers, cpu_answers, strict=True) if g is not None and c is not None]
    if not pairs:
        return {}
    same = sum(top_label(g) == top_label(c) for g, c in pairs)
    changes = []
    for g, c in pairs:
        shared = set(g["probabilities"]) & set(c["probabilities"])
        changes += [abs(g["probabilities"][k] - c["probabilities"][k]) for k in shared]
    top1 = [abs((top_probability(g) or 0.0) - (top_probability(c) or 0.0)) for g, c in pairs]
    return {"cases": len(pairs), "top1_label_agreement": round(same / len(pairs), 4),
            "max_top1_probability_change": round(max(top1), 6),
            "max_shared_probability_change": round(max(changes, default=0.0), 6)}


# ---- 4. in-process ceilings --------------------------------------------------------------------

def _rate(step: Any, items: int, duration: float, sync: Any) -> float:
    step()
    sync()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < duration:
        step()
        done += items
    sync()
    return round(done / (time.perf_counter() - started), 1)


def ceilings(local: Any, cases: list[Case], batch: int, duration: float) -> dict[str, Any]:
    """Items/s in one process: the whole handler (decode + infer + encode) at the served batch size and at
    256, the batched decode and preprocessing alone, and the model alone."""
    import torch

    from handlers.payload import extract, parse_json_bytes
    from loadtest.inprocess import request_row

    handler = local.handler
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    result: dict[str, Any] = {"batch_size": batch, "device": str(handler.device)}
    for size in dict.fromkeys([batch, 256]):
        group = [cases[k % len(cases)] for k in range(size)]
        result[f"handler_b{size}_items_per_s"] = _rate(lambda g=group: local.handle(g), size, duration, sync)
    for size in dict.fromkeys([batch, 256]):
        group = [cases[k % len(cases)] for k in range(size)]
        payloads = [extract(request_row(c)) for c in group]
        with torch.inference_mode():
            items = [handler.decode(parse_json_bytes(p) if isinstance(p, bytes) else p) for p in payloads]
            result[f"preprocess_b{size}_items_per_s"] = _rate(lambda i=items: handler.collate(i), size, duration, sync)
            inputs = handler.collate(items)
            result[f"model_b{size}_items_per_s"] = _rate(lambda x=inputs: handler.infer(x), size, duration, sync)
    result["handler_items_per_s"] = max(v for k, v in result.items() if k.startswith("handler_b"))
    gpu = getattr(handler, "gpu_images", None)
    result["decoder_counts"] = dict(gpu.counts) if gpu is not None else {"cpu": len(cases)}
    return result


# ---- 5. served -----------------------------------------------------------------------------------

class GpuSampler:
    """nvidia-smi's utilisation and memory every `interval` s on a thread (nothing where there is no GPU)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = shutil.which("nvidia-smi") is not None

    def _query(self) -> tuple[float, float] | None:
        try:
            line = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,"
                                   "nounits", "--id=0"], capture_output=True, text=True, timeout=5).stdout.strip()
            util, memory = (float(x) for x in line.split(",")[:2])
            return util, memory
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            sample = self._query()
            if sample is not None:
                self.samples.append(sample)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {}
        util = [u for u, _ in self.samples]
        return {"util_percent_mean": round(sum(util) / len(util), 1), "util_percent_max": max(util),
                "memory_used_mib_max": max(m for _, m in self.samples), "samples": len(self.samples)}


def gpu_processes() -> dict[int, float]:
    """MiB of GPU memory per process (pid), from nvidia-smi; empty without one."""
    if shutil.which("nvidia-smi") is None:
        return {}
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10).stdout
    found = {}
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            pid, memory = line.split(",")[:2]
            found[int(pid)] = float(memory)
    return found


def _client(cases: list[Case], users: int, duration: float, url: str, start_at: float, offset: int) -> dict[str, Any]:
    """One client process: waits for the common start, runs the closed loop, returns its result and CPU time."""
    from loadtest.loadgen import load

    time.sleep(max(0.0, start_at - time.time()))
    cpu = time.process_time()
    shifted = cases[offset % len(cases):] + cases[:offset % len(cases)]
    result = load(shifted, users, duration, url=url, warmup_s=1.0)
    return {"result": dataclasses.asdict(result), "cpu_s": time.process_time() - cpu}


def load_from_processes(cases: list[Case], level: int, duration: float, url: str,
                        clients: int) -> tuple[LoadResult, dict[str, Any]]:
    """`level` users spread over up to `clients` processes; one merged result and the clients' CPU."""
    processes = max(1, min(clients, level))
    users = [level // processes + (n < level % processes) for n in range(processes)]
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + 2.0 + 0.1 * processes
    with context.Pool(processes) as pool:
        jobs = [pool.apply_async(_client, (cases, u, duration, url, start_at, n * 7)) for n, u in enumerate(users)]
        parts = [job.get(timeout=duration + 120) for job in jobs]
    merged = LoadResult(elapsed_s=duration)
    cpu = 0.0
    for part in parts:
        result = part["result"]
        merged.started += result["started"]
        merged.latency_ms += result["latency_ms"]
        merged.failed += result["failed"]
        merged.failed_at += result["failed_at"]
        for reason, count in result["failures"].items():
            merged.failures[reason] = merged.failures.get(reason, 0) + count
        cpu += part["cpu_s"]
    return merged, {"processes": processes, "cpu_percent": round(100.0 * cpu / (duration + 1.0), 1)}


#: every row measured so far, rewritten after each level: a run cut off by the device's time limit keeps them
PARTIAL: dict[str, Any] = {"rows": [], "file": None}


def save_partial(row: dict[str, Any]) -> None:
    PARTIAL["rows"].append(row)
    if PARTIAL["file"] is not None:
        Path(PARTIAL["file"]).write_text(json.dumps({"partial": True, "rows": PARTIAL["rows"]}, indent=2) + "\n")


def serve_and_measure(label: str, model: str, store: Path, cases: list[Case], levels: list[int], duration: float,
                      warmup: float, clients: int,
                      gpus: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`gpus`: serve on the first N GPUs only (TorchServe's number_of_gpu; the workers follow, "
    "tsforge/serving/gpus.py)."""
    from loadtest import report
    from loadtest.monitor import MetricsScraper, monitored
    from loadtest.serving import torchserve

    rows = []
    memory: dict[str, Any] = {}
    overrides = {} if gpus is None else {"number_of_gpu": str(gpus)}
    with torchserve([model], store=store, name=f"gpu-bench-{label}", overrides=overrides, timeout=600) as server:
        url = f"{server.url('inference')}/predictions/{model}"
        started = time.perf_counter()
        load_from_processes(cases, max(levels), warmup, url, clients)
        memory["start_mib"] = gpu_processes()
        memory["warmup_s"] = round(time.perf_counter() - started, 1)
        for level in levels:
            scraper = MetricsScraper(server.url("metrics"), model)
            scraper.start()
            with GpuSampler() as gpu, monitored(report.server_pid(server.run_dir)) as usage:
                result, client = load_from_processes(cases, level, duration, url, clients)
            summary = report.summarize(result, tool="loadgen", model=model, protocol="rest", users=level,
                                       target=url, server=usage, torchserve=scraper.stop())
            summary.pop("machine")
            rows.append({**summary, "target": label, "level": level, "client": client, "gpu": gpu.summary()})
            save_partial(rows[-1])
            print(f"  {label:8s} c={level:<4d} {summary['qps']:8.1f} img/s  P50 {summary['latency_ms']['p50']:8.1f} ms"
                  f"  P99 {summary['latency_ms']['p99']:8.1f} ms  ok {summary['success_rate']:.1%}  GPU "
                  f"{gpu.summary().get('util_percent_mean', '-')} %  client CPU {client['cpu_percent']} %", flush=True)
        memory["end_mib"] = gpu_processes()
    return rows, memory


def sweep_point(setting: str, args: argparse.Namespace, levels: list[int], cases: list[Case]) -> list[dict[str, Any]]:
    """tsforge served with the config's `gpu:` TorchServe keys replaced by WORKERSxBATCHxDELAY_MS."""
    import yaml

    workers, batch, delay = (int(x) for x in setting.lower().split("x"))
    config = yaml.safe_load((args.config or ROOT / "config" / "models" / f"{args.model}.yaml").read_text())
    config["gpu"] = {**(config.get("gpu") or {}), "minWorkers": workers, "maxWorkers": workers,
                     "batchSize": batch, "maxBatchDelay": delay}
    config_file = BUILD / f"sweep-{setting}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    store = BUILD / "sweep-store"
    export_and_archive(args.model, args.model_name, args.handler, config_file, args.build_dir, store)
    rows, _ = serve_and_measure(f"sweep-{setting}", args.model_name or args.model, store, cases, levels,
                                args.duration, min(args.warmup, 5.0), args.clients)
    return rows


# ---- report --------------------------------------------------------------------------------------

#: what the stock handler is, beside its settings: TorchServe's image_classifier decodes with Pillow, in fp32
STOCK_FACTS = {"precision": "fp32", "decoder": "Pillow"}
PAYLOADS = {"img": "crops and mirror images of the two photos, 640 pixels wide, as raw JPEG bodies",
            "texts": "sentences of 5-60 words, as text and JSON bodies"}


def _mib_range(per_process: dict[Any, float]) -> list[float] | None:
    values = list(per_process.values())
    return [min(values), max(values)] if values else None


def compact_gpu_row(row: dict[str, Any]) -> dict[str, Any]:
    """A served row as docs/data keeps it: the figures the GPU page shows, no bulk."""
    gpu, client = row.get("gpu") or {}, row.get("client") or {}
    keys = ("target", "level", "stock_handler", "qps", "requests", "failures", "success_rate", "latency_ms")
    kept: dict[str, Any] = {k: row[k] for k in keys if k in row}
    return {**kept, "gpu": {k: gpu.get(k) for k in ("util_percent_mean", "util_percent_max", "memory_used_mib_max")},
            "client": {"cpu_percent": client.get("cpu_percent"), "processes": client.get("processes")},
            "server": {"cpu_percent": (row.get("server") or {}).get("cpu_percent")}}


def data_summary(result: dict[str, Any], raw: Path) -> dict[str, Any]:
    """The small JSON for docs/data/gpu-NAME.json (schema loadtest.render_gpu.SCHEMA), which the GPU page renders."""
    from loadtest import render_gpu, report

    memory = {target: {"after_warmup": _mib_range(m.get("start_mib") or {}),
                       "after_run": _mib_range(m.get("end_mib") or {})}
              for target, m in result["gpu_memory_per_process_mib"].items()}
    return {"schema": render_gpu.SCHEMA, "model": result["model"], "label": None, "unit": result["unit"],
            "created": result["created"], "command": result["command"], "machine": result["machine"],
            "source": None, "archive_config": result["archive_config"], "handler_config": result["handler_config"],
            **{k: result[k] for k in ("levels", "duration_s", "warmup_s", "clients", "gpu_sample_interval_s",
                                      "stock", "payloads", "ceiling", "parity", "notes", "gpu_scaling", "wall_s")},
            "rows": [compact_gpu_row(r) for r in result["rows"]],
            "ratios": {str(level): ratio for level, ratio in result["ratios"].items()},
            "gpu_memory_per_worker_mib": {k: v for k, v in memory.items() if v["after_warmup"] and v["after_run"]},
            "previous": None, "programs": None, "raw_report": report.shown(raw)}


def write_reports(result: dict[str, Any], args: argparse.Namespace) -> Path:
    """OUT/gpu-bench.{json,md,png} and the committed summary DATA/gpu-NAME.json; returns the summary's path."""
    from loadtest import render_gpu, report
    from loadtest.render import bench_plot

    raw = args.out / "gpu-bench.json"
    raw.write_text(json.dumps(result, indent=2) + "\n")
    data = data_summary(result, raw)
    path = report.write_data(data, (args.data or args.out) / f"gpu-{result['model']}.json")
    text = render_gpu.run_markdown(data, report.shown(path))
    (args.out / "gpu-bench.md").write_text(text)
    if result["rows"]:
        ceiling = result["ceiling"]
        bench_plot({"model": result["model"], "rows": result["rows"],
                    "ceiling": {"handler_items_per_s": ceiling["handler_items_per_s"]} if ceiling else None},
                   args.out / "gpu-bench.png")
    print(text)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.gpu_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="a declared model (image or text handler)")
    parser.add_argument("--mar", type=Path, help="serve this archive as built (no export here)")
    parser.add_argument("--model-name", help="serve the export under another name (with --handler, --config)")
    parser.add_argument("--handler", help="entry handler file (default: the model's)")
    parser.add_argument("--config", type=Path, help="model-config.yaml (default: config/models/MODEL.yaml)")
    parser.add_argument("--levels", default="16,64,256")
    parser.add_argument("--stock-levels", help="concurrency levels for the stock handler (default: --levels)")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per level")
    parser.add_argument("--stock-duration", type=float, help="measured seconds per stock level (default: --duration)")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds of load before measuring each server")
    parser.add_argument("--clients", type=int, default=8, help="client processes")
    parser.add_argument("--payload-count", type=int, default=32)
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"any of {', '.join(TARGETS)}")
    parser.add_argument("--sweep", default="", help="also serve tsforge with these gpu settings, "
                        "WORKERSxBATCHxDELAY_MS comma-separated (e.g. 4x64x5,2x128x5), at --sweep-levels")
    parser.add_argument("--sweep-levels", default="256")
    parser.add_argument("--gpu-counts", default="", help="also serve tsforge as shipped on the first N GPUs for each "
                        "N (e.g. 1,2,4): the scaling over a host's GPUs, measured in one run")
    parser.add_argument("--ceiling-duration", type=float, default=3.0)
    parser.add_argument("--build-dir", type=Path, default=BUILD / "export",
                        help="where the export goes (an existing export there is reused)")
    parser.add_argument("--bundle", type=Path,
                        help="tarball of TorchServe's unpacked wheels (+ jre/) when not installed")
    parser.add_argument("--wheels", type=Path, help="folder of pure-Python wheels to install first (no index)")
    parser.add_argument("--photos", type=Path, help="folder with china.jpg and flower.jpg (no scikit-learn)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu-bench")
    parser.add_argument("--data", type=Path, help="where the committed summary gpu-NAME.json goes (default: --out; "
                        "docs/data to re-render the GPU page with `make benchmarks-doc`)")
    return parser.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def prepare_archive(args: argparse.Namespace, name: str, store: Path) -> tuple[Path, dict[str, Any]]:
    """The archive to serve: `--mar` as built elsewhere, else exported (if need be) and archived here."""
    if args.mar is not None:
        store.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(args.mar, store / f"{name}.mar")), {"prebuilt": args.mar.name}
    return export_and_archive(args.model, args.model_name, args.handler, args.config, args.build_dir, store)


def gpu_parity(mar: Path, bodies: list[Case], gpu_answers: list[Any], text: bool) -> dict[str, Any]:
    """The served path against fp32 TorchScript on the CPU; for images also the decoder alone (fp32 both sides)."""
    fp32 = {"precision": "fp32", "backend": "torchscript"}

    def answers_of(handler: Any) -> list[Any]:
        return [json.loads(b) if s == 200 else None for s, b in handler.handle(bodies)]

    cpu_answers = answers_of(local_handler(mar, False, fp32, batch_size=1))
    if text:
        return {"served": embedding_parity(gpu_answers, cpu_answers)}
    return {"served": parity(gpu_answers, cpu_answers),
            "fp32_decoder_only": parity(answers_of(local_handler(mar, True, fp32, batch_size=1)), cpu_answers)}


def in_process(args: argparse.Namespace, mar: Path, gpu: bool, text: bool, batch: int) -> dict[str, Any]:
    """Payloads with references from the archive's handler here, the parity figures and the in-process ceilings."""
    from loadtest.payloads import sentence_cases

    local = local_handler(mar, gpu)
    print(f"  in-process handler on {local.handler.device}: {json.dumps(local.handler.selection.get('variant'))}",
          flush=True)
    bodies = sentence_cases(args.payload_count, 0) if text else photo_jpegs(args.payload_count)
    cases, gpu_answers = references(local, bodies)
    if not cases:
        raise SystemExit(f"the archive's handler answered none of the {len(bodies)} payloads in-process (see its "
                         "log above); nothing to measure")
    found = {"cases": cases, "parity": gpu_parity(mar, bodies, gpu_answers, text) if gpu else {},
             "ceiling": None, "selection": local.handler.selection}
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if "ceiling" in targets:
        found["ceiling"] = ceilings(local, cases, batch, args.ceiling_duration)
        print(f"  ceiling  {json.dumps(found['ceiling'])}", flush=True)
    return found


def serve_stock(args: argparse.Namespace, cases: list[Case], notes: list[str]) -> tuple[list[dict[str, Any]],
                                                                                         dict[str, Any], Any]:
    """The stock handler's rows, its GPU memory and what it was (None without one for this model)."""
    from loadtest.stock import stock_handler

    handler = stock_handler(args.model)
    if handler != "image_classifier":
        notes.append("no stock handler: TorchServe ships none for sentence embeddings" if handler is None else
                     f"no stock handler: the GPU bench serves image_classifier only, not {handler}")
        return [], {}, None
    store = stock_archive(args.model, args.build_dir / args.model, BUILD / "stock-store").parent
    # The stock handler answers {label: probability} in fp32: demand the label only.
    stock_cases = [Case(c.name, c.body, c.content_type, {"label": c.expect["label"]}) for c in cases
                   if "label" in c.expect]
    duration, warmup = args.stock_duration or args.duration, min(args.warmup, 5.0)
    rows, memory = serve_and_measure("stock", args.model, store, stock_cases, _ints(args.stock_levels or args.levels),
                                     duration, warmup, args.clients)
    for row in rows:
        row["stock_handler"] = handler
    config = {k: STOCK_CONFIG[k] for k in ("maxWorkers", "batchSize", "maxBatchDelay")}
    return rows, memory, {"handler": handler, "config": config, **STOCK_FACTS, "duration_s": duration,
                          "warmup_s": warmup}


def serve_all(args: argparse.Namespace, name: str, store: Path, cases: list[Case],
              notes: list[str]) -> dict[str, Any]:
    """Every served measurement: tsforge, on N GPUs, the stock handler, the sweep. Rows, memory, stock."""
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    levels, rows, memory = _ints(args.levels), [], {}
    if "tsforge" in targets:
        served, memory["tsforge"] = serve_and_measure("tsforge", name, store, cases, levels, args.duration,
                                                      args.warmup, args.clients)
        rows += served
    for count in _ints(args.gpu_counts):
        served, memory[f"tsforge-{count}gpu"] = serve_and_measure(
            f"tsforge-{count}gpu", name, store, cases, levels, args.duration, args.warmup, args.clients, gpus=count)
        rows += served
    stock = None
    if "stock" in targets:
        served, memory["stock"], stock = serve_stock(args, cases, notes)
        rows += served
        memory = {k: v for k, v in memory.items() if v}
    for setting in [s.strip() for s in args.sweep.split(",") if s.strip()]:
        rows += sweep_point(setting, args, _ints(args.sweep_levels), cases)
    return {"rows": rows, "gpu_memory_per_process_mib": memory, "stock": stock}


def ratios_and_scaling(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """tsforge / stock at each level, and each GPU count's throughput over one GPU's."""
    tsforge_qps = {r["level"]: r["qps"] for r in rows if r["target"] == "tsforge"}
    ratios = {r["level"]: round(tsforge_qps[r["level"]] / r["qps"], 1) for r in rows
              if r["target"] == "stock" and r["qps"] and r["level"] in tsforge_qps}
    one_gpu = {r["level"]: r["qps"] for r in rows if r["target"] == "tsforge-1gpu" and r["qps"]}
    scaling = {r["target"]: {r2["level"]: round(r2["qps"] / one_gpu[r2["level"]], 2) for r2 in rows
                             if r2["target"] == r["target"] and r2["level"] in one_gpu}
               for r in rows if r["target"].startswith("tsforge-") and r["target"] != "tsforge-1gpu"}
    return {"ratios": ratios, "gpu_scaling": scaling}


def machine() -> dict[str, Any]:
    """report.machine() and the torchvision beside torch (the GPU path decodes and resizes with it)."""
    from importlib.metadata import PackageNotFoundError, version

    from loadtest import report

    try:
        torchvision = version("torchvision")
    except PackageNotFoundError:
        torchvision = None
    return {**report.machine(), "torchvision": torchvision}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    notes = setup(args.bundle, args.wheels, args.photos)
    import torch
    import yaml

    from export.registry import get
    from loadtest import report
    from loadtest.inprocess import unpack

    name, store = args.model_name or args.model, BUILD / "store"
    args.out.mkdir(parents=True, exist_ok=True)
    PARTIAL["file"] = str(args.out / "gpu-bench.partial.json")
    gpu = torch.cuda.is_available()
    print(f"gpu-bench {name}: {'GPU ' + torch.cuda.get_device_name(0) if gpu else 'no GPU: CPU run'}", flush=True)
    mar, timings = prepare_archive(args, name, store)
    model_config = yaml.safe_load((unpack(mar) / "model-config.yaml").read_text()) or {}
    text = get(args.model).handler.endswith("text_handler.py")
    found = in_process(args, mar, gpu, text, int(model_config.get("batchSize") or 1))
    cases = found.pop("cases")
    if gpu:  # the in-process handlers' memory goes back before the server's workers want theirs
        torch.cuda.empty_cache()
    served = serve_all(args, name, store, cases, notes)
    result = {
        "model": name, "unit": "texts" if text else "img",
        "archive_config": {k: v for k, v in model_config.items() if k != "handler"},
        "handler_config": model_config.get("handler"), "levels": _ints(args.levels), "duration_s": args.duration,
        "warmup_s": args.warmup, "clients": args.clients, "gpu_sample_interval_s": GpuSampler().interval,
        "payloads": {"count": len(cases), "kinds": sorted({c.content_type for c in cases}),
                     "mean_bytes": round(sum(len(c.body) for c in cases) / max(1, len(cases))),
                     "description": PAYLOADS["texts" if text else "img"]},
        "setup": {**timings, "notes": notes}, "notes": notes, **found, **served,
        **ratios_and_scaling(served["rows"]),
        "command": "python -m loadtest.gpu_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "wall_s": round(time.time() - started, 1), "created": report.now(),
    }
    data = write_reports(result, args)
    print(f"reports: {args.out}; committed summary: {report.shown(data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
