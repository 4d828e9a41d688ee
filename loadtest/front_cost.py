"""What the standard v2 front costs: the same v2 requests straight to TorchServe and through the front.

    python -m loadtest.front_cost --models resnet18,digits --users 16 --duration 20 --rounds 2

One TorchServe (dev profile, free ports) with the models and the front beside it (tsforge/serving/frontproc.py). Each
request is a v2 infer of one real input (scikit-learn's photos, digit images) as a base64 BYTES element, so both
paths parse the same JSON; every answer must be a 200. A third path sends the same element through the front in
the binary tensor extension, as tritonclient's HTTP client does by default (its own request encoder), with a JSON
answer asked for: that form goes through KServe's decoding, which TorchServe cannot read. The paths alternate
`--rounds` times per model in one session, so drift hits all. Writes OUT/front-cost.{json,md}.
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
from tsforge import extras
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


def binary_cases(model: str, cases: list[Case]) -> list[Case]:
    """The same requests in the v2 binary tensor extension, encoded by tritonclient (JSON answer asked for)."""
    import numpy as np
    import yaml

    extras.require("tritonclient", "loadtest", "bench-front (the v2 binary requests)")
    from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

    declared = yaml.safe_load((ROOT / "config" / "models" / f"{model}.yaml").read_text())["v2"]["outputs"]
    outputs = [InferRequestedOutput(output["name"], binary_data=False) for output in declared]

    encoded = []
    for case in cases:
        tensor = json.loads(case.body)["inputs"][0]
        element = InferInput(tensor["name"], tensor["shape"], "BYTES")
        # the base64 text as the element: KServe's REST decoder reads BYTES as UTF-8 (raw JPEG bytes are refused)
        element.set_data_from_numpy(np.array([tensor["data"][0].encode()], dtype=np.object_))
        body, header_length = InferenceServerClient.generate_request_body([element], outputs=outputs)
        encoded.append(Case(case.name, body, "application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(header_length)}))
    return encoded


def measure(url: str, cases: list[Case], users: int, duration: float) -> dict[str, Any]:
    from loadtest.loadgen import load
    from loadtest.report import latency_stats

    result = load(cases, users, duration, url=url, warmup_s=1.0)
    stats = latency_stats(result.latency_ms) if result.latency_ms else {"p50": None, "p99": None}
    return {"req_per_s": round(len(result.latency_ms) / duration, 1), "p50_ms": stats["p50"],
            "p99_ms": stats["p99"], "failed": result.failed, "failures": result.failures}


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [f"Concurrency {report['users']}, {report['duration_s']:g} s per run, {report['rounds']} rounds "
             f"alternating; {machine['cores']} cores ({machine['cpu']}).", "",
             "| model | path | req/s | P50 ms | P99 ms | failed | / direct |",
             "|---|---|---:|---:|---:|---:|---:|"]
    names = {"direct": "direct (JSON)", "front": "front (JSON)", "front_binary": "front (binary extension)"}
    for model, entry in report["models"].items():
        for path, name in names.items():
            row = entry[path]
            ratio = f"{row['ratio']:.2f}" if "ratio" in row else ""
            lines.append(f"| {model} | {name} | {row['req_per_s']:,.1f} | {row['p50_ms']} | {row['p99_ms']} | "
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
    parser.add_argument("--data", type=Path,
                        help="the small summary to commit (make bench-front: docs/data/front-cost.json); default: "
                             "OUT/front-cost-summary.json")
    args = parser.parse_args(argv)
    from loadtest import report as report_module
    from loadtest.serving import torchserve
    from tsforge.serving import frontproc

    # The extras the run needs, before TorchServe starts: one line naming the extra.
    extras.need("kserve", "front", "bench-front (the v2 front)")
    extras.need("tritonclient", "loadtest", "bench-front (the v2 binary requests)")
    models = [m for m in args.models.split(",") if m]
    results: dict[str, Any] = {}
    with torchserve(models, name="front-cost") as server:
        front = frontproc.start(server.run_dir, server.props, server.url("inference"), models, None, timeout=120)
        for model in models:
            cases = v2_cases(model, 16)
            paths = {"direct": (f"{server.url('inference')}/v2/models/{model}/infer", cases),
                     "front": (f"{front}/v2/models/{model}/infer", cases),
                     "front_binary": (f"{front}/v2/models/{model}/infer", binary_cases(model, cases))}
            runs: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
            for _ in range(args.rounds):
                for path, (url, path_cases) in paths.items():
                    runs[path].append(measure(url, path_cases, args.users, args.duration))
                    print(f"  {model:9s} {path:6s} {runs[path][-1]}", flush=True)
            merged = {path: {"req_per_s": round(sum(r["req_per_s"] for r in rs) / len(rs), 1),
                             "p50_ms": max(r["p50_ms"] or 0 for r in rs), "p99_ms": max(r["p99_ms"] or 0 for r in rs),
                             "failed": sum(r["failed"] for r in rs), "runs": rs} for path, rs in runs.items()}
            assert all(r["failed"] == 0 for rs in runs.values() for r in rs), f"{model}: some answers were not 200"
            for path in ("front", "front_binary"):
                merged[path]["ratio"] = round(merged[path]["req_per_s"] / max(merged["direct"]["req_per_s"], 1e-9), 3)
            merged["ratio"] = merged["front"]["ratio"]
            results[model] = merged
    report = {"models": results, "users": args.users, "duration_s": args.duration, "rounds": args.rounds,
              "machine": report_module.machine(), "created": report_module.now(),
              "command": "python -m loadtest.front_cost " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "front-cost.json").write_text(json.dumps(report, indent=2) + "\n")
    committed = {model: {path: ({k: v for k, v in row.items() if k != "runs"} if isinstance(row, dict) else row)
                         for path, row in paths.items()} for model, paths in results.items()}
    report_module.write_data({"schema": "tsforge.serving.front-cost/1", **report, "models": committed,
                              "raw_report": report_module.shown(args.out / "front-cost.json")},
                              args.data or args.out / "front-cost-summary.json")
    (args.out / "front-cost.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"({time.time() - started:.0f} s)")
    sys.exit(code)
