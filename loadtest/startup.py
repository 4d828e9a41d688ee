"""Worker start with `auto`: how long the first worker of a model takes (it times the candidates and checks
them on the held-out inputs), and how long the others take (they reuse its recorded choice).

    python -m loadtest.startup --models resnet18,digits,minilm --out docs/data/startup.json

Per model, a real TorchServe with no models and an empty choice cache: the archive is registered with its
configured workers, synchronously (the call returns when they are ready: the first measures under the
cache's lock while the others wait for its choice), then one more worker is added, synchronously too, as a
restart or a scale-up would (it reuses the recorded choice). Both calls are timed by the wall clock, so
Python's start, `import torch` and the model's load count, as a user waits for them. The bounds
(`--first-s`, `--others-s`) are checked, and the run fails when one is exceeded. The JSON is small and
committed; docs/reliability.md shows it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests
import yaml

from loadtest import report
from loadtest.serving import selection
from tsforge.project import ROOT
from tsforge.serving.server import TorchServe, free_port_overrides

DEFAULT_CONFIG = ROOT / "config" / "config.properties"
SCHEMA = "tsforge.startup/1"


def timed(call: Any, *args: Any, **kwargs: Any) -> tuple[float, requests.Response]:
    started = time.perf_counter()
    response = call(*args, **kwargs)
    return round(time.perf_counter() - started, 2), response


def measure(model: str, store: Path, workers: int, scratch: Path) -> dict[str, Any]:
    """One model's worker start times on a server of its own, with an empty choice cache."""
    server = TorchServe(config=DEFAULT_CONFIG, run_dir=scratch / model, model_store=store, models=[],
                        overrides={**free_port_overrides(), "load_models": ""},  # registered below, timed
                        env={"TSFORGE_CACHE_DIR": str(scratch / f"cache-{model}")})
    server.start()
    try:
        server.wait_ready([], timeout=120)
        management = server.url("management")
        first_s, registered = timed(requests.post, f"{management}/models", timeout=600, headers=server.auth(
            "management"), params={"url": f"{model}.mar", "initial_workers": workers, "synchronous": "true"})
        registered.raise_for_status()
        others_s, scaled = timed(requests.put, f"{management}/models/{model}", timeout=600, headers=server.auth(
            "management"), params={"min_worker": workers + 1, "max_worker": workers + 1, "synchronous": "true"})
        scaled.raise_for_status()
        chosen = selection(server, model)
        measured, reused = decisions(server.run_dir / "logs" / "model_log.log", workers + 1)
    finally:
        server.stop()
    return {"model": model, "workers": workers, "first_worker_s": first_s, "added_worker_s": others_s,
            "workers_measuring": measured, "workers_reusing": reused,
            "variant": chosen.get("variant"), "accuracy": chosen.get("accuracy"),
            "candidates": chosen.get("candidates"), "reason": chosen.get("reason")}


def decisions(model_log: Path, workers: int, wait_s: float = 10.0) -> tuple[int, int]:
    """How many workers measured and how many reused a recorded choice, from their "serving ..." log lines
    (the log appender is asynchronous: wait up to `wait_s` for one line per worker)."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = [line for line in model_log.read_text().splitlines() if "serving " in line and '"reason"' in line]
        reused = sum('"reason": "measured by worker' in line for line in lines)
        if len(lines) >= workers or time.monotonic() > deadline:
            return len(lines) - reused, reused
        time.sleep(0.2)


def configured_workers(model: str) -> int:
    config = yaml.safe_load((ROOT / "config" / "models" / f"{model}.yaml").read_text()) or {}
    return int(config.get("minWorkers") or 1)


def markdown(result: dict[str, Any]) -> str:
    """The worker-start table of a startup.json, as docs/benchmarks.md shows it."""
    bounds = result["bounds_s"]
    lines = [f"| model | workers | configured workers ready (s) | one more worker (s) | serves | held-out check | "
             f"within {bounds['first_worker']} s / {bounds['added_worker']} s |", "|---|---:|---:|---:|---|---|---|"]
    for row in result["models"]:
        check = row.get("accuracy")
        checked = "fp32 itself" if not check else f"{check['measure']} {check['value']} (>= {check['minimum']})"
        lines.append(f"| {row['model']} | {row['workers']} | {row['first_worker_s']} | {row['added_worker_s']} | "
                     f"{row['variant']} | {checked} | {'yes' if row['within_bounds'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18", help="comma-separated archive names in the store")
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "startup" / "startup.json",
                        help="the JSON written (make bench-startup: docs/data/startup.json, committed)")
    parser.add_argument("--first-s", type=float, default=20.0,
                        help="bound on the configured workers' start, the first one measuring (s)")
    parser.add_argument("--others-s", type=float, default=3.0,
                        help="bound on a worker added later, which reuses the choice (s)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tsforge-startup-") as scratch:
        for model in [m for m in args.models.split(",") if m]:
            row = measure(model, args.store.resolve(), configured_workers(model), Path(scratch))
            row["within_bounds"] = row["first_worker_s"] <= args.first_s and row["added_worker_s"] <= args.others_s
            print(f"{model}: {row['workers']} workers ready in {row['first_worker_s']} s, one more in "
                  f"{row['added_worker_s']} s, serving {row['variant']}")
            rows.append(row)
    result = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "bounds_s": {"first_worker": args.first_s, "added_worker": args.others_s}, "models": rows,
              "machine": report.machine(), "command": f"python -m loadtest.startup --models {args.models}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(row["within_bounds"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
