"""What the standard v2 front costs: the same v2 requests straight to TorchServe and through the front.

    python -m loadtest.front_cost --models resnet18,digits --users 16 --duration 20 --rounds 2

One TorchServe (dev profile, free ports) with the models and the front beside it (tsforge/frontproc.py). Each
request is a v2 infer of one real input (scikit-learn's photos, digit images) as a base64 BYTES element, so both
paths parse the same JSON; every answer must be a 200. Direct and front runs
alternate `--rounds` times per model in one session, so drift hits both. Writes OUT/front-cost.{json,md}.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.payloads import Case, raw_cases
from tsforge.project import ROOT


def v2_cases(model: str, count: int) -> list[Case]:
    """One v2 request per raw payload of `model` (an image body), the element base64 as the JSON form wants."""
    mar = ROOT / "model_store" / f"{model}.mar"
    cases = []
    for case in raw_cases(model, mar, count=2 * count):
        if not case.content_type.startswith("image/"):  # the JSON and .npy forms of the same inputs
            continue
        tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(case.body).decode()]}
        cases.append(Case(case.name, json.dumps({"inputs": [tensor]}).encode(), "application/json"))
    return cases


def measure(url: str, cases: list[Case], users: int, duration: float) -> dict[str, Any]:
    from loadtest.loadgen import load

    result = load(cases, users, duration, url=url, warmup_s=1.0)
    latency = sorted(result.latency_ms)
    pick = (lambda q: round(latency[min(len(latency) - 1, int(q * len(latency)))], 1)) if latency else (lambda q: None)
    return {"req_per_s": round(len(latency) / duration, 1), "p50_ms": pick(0.5), "p99_ms": pick(0.99),
            "failed": result.failed, "failures": result.failures}


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [f"Concurrency {report['users']}, {report['duration_s']:g} s per run, {report['rounds']} rounds "
             f"alternating; {machine['cores']} cores ({machine['cpu']}).", "",
             "| model | path | req/s | P50 ms | P99 ms | failed | front / direct |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model, entry in report["models"].items():
        for path in ("direct", "front"):
            row = entry[path]
            ratio = f"{entry['ratio']:.2f}" if path == "front" else ""
            lines.append(f"| {model} | {path} | {row['req_per_s']:,.1f} | {row['p50_ms']} | {row['p99_ms']} | "
                         f"{row['failed']} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.front_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,digits")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "front-cost")
    args = parser.parse_args(argv)
    from loadtest import report as report_module
    from loadtest.serving import torchserve
    from tsforge import frontproc

    models = [m for m in args.models.split(",") if m]
    results: dict[str, Any] = {}
    with torchserve(models, name="front-cost") as server:
        front = frontproc.start(server.run_dir, server.props, server.url("inference"), models, None, timeout=120)
        for model in models:
            cases = v2_cases(model, 16)
            urls = {"direct": f"{server.url('inference')}/v2/models/{model}/infer",
                    "front": f"{front}/v2/models/{model}/infer"}
            runs: dict[str, list[dict[str, Any]]] = {"direct": [], "front": []}
            for _ in range(args.rounds):
                for path, url in urls.items():
                    runs[path].append(measure(url, cases, args.users, args.duration))
                    print(f"  {model:9s} {path:6s} {runs[path][-1]}", flush=True)
            merged = {path: {"req_per_s": round(sum(r["req_per_s"] for r in rs) / len(rs), 1),
                             "p50_ms": max(r["p50_ms"] or 0 for r in rs), "p99_ms": max(r["p99_ms"] or 0 for r in rs),
                             "failed": sum(r["failed"] for r in rs), "runs": rs} for path, rs in runs.items()}
            assert all(r["failed"] == 0 for rs in runs.values() for r in rs), f"{model}: some answers were not 200"
            merged["ratio"] = round(merged["front"]["req_per_s"] / max(merged["direct"]["req_per_s"], 1e-9), 3)
            results[model] = merged
    report = {"models": results, "users": args.users, "duration_s": args.duration, "rounds": args.rounds,
              "machine": report_module.machine(), "created": report_module.now(),
              "command": "python -m loadtest.front_cost " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "front-cost.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "front-cost.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"({time.time() - started:.0f} s)")
    sys.exit(code)
