"""What form-body floods cost digits, straight to TorchServe and through the front (issue 19, item 5).

    python -m loadtest.form_flood [--duration 30] [--users 4] [--flooders 4] [--fields 800000] [--out DIR]

One TorchServe (dev profile, free ports) with digits, and the v2 front beside it (tsforge/serving/frontproc.py). For
each
path, front first (a flooded TorchServe takes a while to recover): `--users` closed-loop clients send digits
requests (checked against reference answers) for `--duration` s alone, then again while `--flooders` clients, in a
process of their own, send `application/x-www-form-urlencoded` bodies of `--fields` tiny fields (800,000 fields
are 6.4 MB, under max_request_size) to the same /predictions/digits. Between the paths the run waits, bounded,
until digits answers quickly again. The goal: through the front, digits keeps >= 80 % of its unflooded rate.
Writes OUT/form-flood.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from tsforge.project import ROOT

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
FLOOD_TIMEOUT_S = 60.0  # one flood request's bound (TorchServe took about 12 s each in issue 19)
RECOVERY_S = 180.0
GOAL = 0.8


def form_body(fields: int) -> bytes:
    return b"&".join([b"abcd=ef"] * fields)


def _flood_one(url: str, body: bytes, deadline: float) -> dict[str, int]:
    statuses: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            status = str(requests.post(url, data=body, headers=FORM, timeout=FLOOD_TIMEOUT_S).status_code)
        except requests.RequestException as exc:
            status = type(exc).__name__
        statuses[status] = statuses.get(status, 0) + 1
    return statuses


def flood(url: str, flooders: int, fields: int, duration: float, results: Any) -> None:
    """`flooders` clients, each sending form bodies back to back until `duration` has passed; the answers' statuses
    go to `results` (a queue). Runs in a process of its own, so it takes no CPU from the measuring clients' loop."""
    body = form_body(fields)
    deadline = time.monotonic() + duration
    merged: dict[str, int] = {}
    with ThreadPoolExecutor(flooders) as pool:
        for statuses in pool.map(lambda _: _flood_one(url, body, deadline), range(flooders)):
            for status, count in statuses.items():
                merged[status] = merged.get(status, 0) + count
    results.put(merged)


def measure(url: str, cases: list[Any], users: int, duration: float) -> dict[str, Any]:
    from loadtest.loadgen import load
    from loadtest.report import latency_stats

    result = load(cases, users, duration, url=url, warmup_s=1.0)
    stats = latency_stats(result.latency_ms) if result.latency_ms else {"p50": None, "p99": None}
    return {"req_per_s": round((len(result.latency_ms) - result.failed) / duration, 1), "p50_ms": stats["p50"],
            "p99_ms": stats["p99"], "failed": result.failed, "failures": result.failures}


def flooded(url: str, cases: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Digits measured while the flood runs; the flood starts a second before and outlasts the measurement."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    flood_s = args.duration + 3.0
    process = context.Process(target=flood, args=(url, args.flooders, args.fields, flood_s, results))
    process.start()
    try:
        time.sleep(1.0)
        row = measure(url, cases, args.users, args.duration)
        row["flood_answers"] = results.get(timeout=flood_s + FLOOD_TIMEOUT_S + 30)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
    return row


def recover(url: str, case: Any) -> float:
    """Seconds until one digits request is answered within a second again (bounded by RECOVERY_S)."""
    started = time.monotonic()
    while time.monotonic() - started < RECOVERY_S:
        sent = time.monotonic()
        try:
            ok = requests.post(url, data=case.body, headers={"Content-Type": case.content_type}, timeout=30).ok
        except requests.RequestException:
            ok = False
        if ok and time.monotonic() - sent < 1.0:
            break
        time.sleep(1.0)
    return round(time.monotonic() - started, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.form_flood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per run")
    parser.add_argument("--users", type=int, default=4, help="clients sending digits requests")
    parser.add_argument("--flooders", type=int, default=4, help="clients sending form floods")
    parser.add_argument("--fields", type=int, default=800_000, help="fields per form body")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "form-flood")
    args = parser.parse_args(argv)
    from loadtest import report as report_module
    from loadtest.inprocess import prepared_cases
    from loadtest.serving import torchserve
    from tsforge import extras
    from tsforge.serving import frontproc

    extras.need("kserve", "front", "form-flood (the v2 front)")
    cases = prepared_cases("digits", ROOT / "model_store" / "digits.mar")
    paths: dict[str, Any] = {}
    with torchserve(["digits"], name="form-flood") as server:
        front = frontproc.start(server.run_dir, server.props, server.url("inference"), ["digits"], None, timeout=120)
        for path, base in (("front", front), ("direct", server.url("inference"))):
            url = f"{base}/predictions/digits"
            normal = measure(url, cases, args.users, args.duration)
            print(f"  {path:6s} normal  {normal}", flush=True)
            under_flood = flooded(url, cases, args)
            under_flood["recovery_s"] = recover(url, cases[0])
            print(f"  {path:6s} flooded {under_flood}", flush=True)
            ratio = round(under_flood["req_per_s"] / max(normal["req_per_s"], 1e-9), 3)
            paths[path] = {"normal": normal, "flooded": under_flood, "ratio": ratio}
    report = {"schema": "tsforge.form-flood/1", "model": "digits", "users": args.users, "flooders": args.flooders,
              "fields": args.fields, "body_bytes": len(form_body(args.fields)), "duration_s": args.duration,
              "paths": paths, "goal": {"front_ratio_at_least": GOAL, "met": paths["front"]["ratio"] >= GOAL},
              "machine": report_module.machine(), "created": report_module.now(),
              "command": "python -m loadtest.form_flood " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "form-flood.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({path: {"ratio": row["ratio"], "normal": row["normal"]["req_per_s"],
                             "flooded": row["flooded"]["req_per_s"]} for path, row in paths.items()}))
    print(f"report: {args.out / 'form-flood.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
