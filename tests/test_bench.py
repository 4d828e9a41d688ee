"""`make bench` and `make tune` smoke runs: the raw reports and the committed summaries (docs/data/) are written,
well-formed, small and renderable; the stock handler is measured at its best setting."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from handlers.capabilities import CPU_FLAGS
from loadtest import bench
from loadtest.report import DATA_LIMIT_BYTES
from tests.conftest import ROOT

pytestmark = pytest.mark.integration  # every test here serves through a real TorchServe

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reports = tmp_path_factory.mktemp("reports")
    subprocess.run(["make", "-s", "bench", "MODEL=digits", "LEVELS=1,4", "DURATION=2",
                    "BENCH_ARGS=--warmup 1 --matrix", f"REPORTS={reports}", f"DATA={reports / 'data'}"],
                   cwd=ROOT, check=True)
    return reports / "bench" / "digits"


@pytest.fixture(scope="module")
def stock_reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real ResNet-18 run with two stock settings in the sweep (the default sweeps four): one worker, and
    two workers that must split the cores between them."""
    reports = tmp_path_factory.mktemp("reports")
    args = ("--warmup 2 --targets tsforge,stock,flask --stock-settings 1x1,2x1 --stock-sweep-duration 2 "
            "--stock-sweep-warmup 2")
    subprocess.run(["make", "-s", "bench", "MODEL=resnet18", "LEVELS=2", "DURATION=2", f"BENCH_ARGS={args}",
                    f"REPORTS={reports}", f"DATA={reports / 'data'}"], cwd=ROOT, check=True)
    return reports


def committed(data_dir: Path, model: str) -> dict[str, Any]:
    path = data_dir / f"bench-{model}.json"
    assert 0 < path.stat().st_size <= DATA_LIMIT_BYTES
    found: dict[str, Any] = json.loads(path.read_text())
    return found


def test_bench_measures_every_applicable_server_at_every_level(bench_reports: Path) -> None:
    result = json.loads((bench_reports / "bench.json").read_text())
    assert [(r["target"], r["level"]) for r in result["rows"]] == [
        ("tsforge", 1), ("tsforge", 4), ("flask", 1), ("flask", 4)]
    assert any("no stock handler" in note for note in result["notes"])  # digits has no TorchServe stock handler
    for row in result["rows"]:
        assert row["requests"] > 0 and row["qps"] > 0, row
        assert row["success_rate"] == 1.0, row["failure_reasons"]
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
        assert row["server"]["cpu_percent"] > 0
        assert "qps_vs_tsforge" in row
    ours = {r["level"]: r for r in result["rows"] if r["target"] == "tsforge"}
    for flask in (r for r in result["rows"] if r["target"] == "flask"):  # a ratio of two servers' measurements
        tsforge = ours[flask["level"]]
        assert flask["qps_vs_tsforge"] == round(flask["qps"] / tsforge["qps"], 3), flask["level"]
    tsforge = [r for r in result["rows"] if r["target"] == "tsforge"]
    assert all(r["torchserve"]["gauges_mean"].get("HandlerBatchSize", 0) >= 1 for r in tsforge)
    ceiling = result["ceiling"]
    assert ceiling["handler_items_per_s"] > 0 and ceiling["model_items_per_s"] >= ceiling["handler_items_per_s"]
    assert result["machine"]["cores"] >= 1 and "loadtest.bench" in result["command"]


def test_bench_matrix_serves_every_variant_beside_autos_choice(bench_reports: Path) -> None:
    result = json.loads((bench_reports / "bench.json").read_text())
    chosen = result["selection"]["variant"]
    cells = {row["variant"]: row for row in result["matrix"]["rows"]}
    assert result["matrix"]["level"] == 4 and chosen in cells
    assert {"torchscript-fp32", "torchscript-int8", "onnxruntime-fp32", "onnxruntime-int8",
            "aotinductor-fp32"} <= set(cells)
    assert all(row.get("qps", 0) > 0 and row["success_rate"] == 1.0 for row in cells.values()), cells
    assert result["selection"]["capabilities"]["device"] == "cpu"
    table = (bench_reports / "bench.md").read_text()
    assert "#### Backend x precision x fusion at concurrency 4" in table and "CPU flags torch reports" in table
    assert f"| {chosen} (auto's choice) |" in table


def test_bench_writes_a_table_and_a_plot(bench_reports: Path) -> None:
    table = (bench_reports / "bench.md").read_text()
    assert "| tsforge handler on TorchServe | 4 |" in table and "| Flask, per-request fp32 | 1 |" in table
    assert "In-process ceiling" in table and "HandlerDecodeTime" in table
    assert (bench_reports / "bench.png").read_bytes()[:8] == PNG


def test_the_committed_summary_is_small_and_carries_the_machine(bench_reports: Path) -> None:
    data_dir = bench_reports.parent.parent / "data"
    data, raw = committed(data_dir, "digits"), json.loads((bench_reports / "bench.json").read_text())
    assert data["schema"] == bench.SCHEMA and data["model"] == "digits"
    assert [(r["target"], r["level"], r["qps"]) for r in data["rows"]] == [
        (r["target"], r["level"], r["qps"]) for r in raw["rows"]]
    machine = data["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and set(machine["cpu_flags"]) <= set(CPU_FLAGS)
    assert machine["torch"] and machine["onnxruntime"] and machine["torchserve"] != "unknown" and machine["date"]
    assert data["raw_report"].endswith("bench/digits/bench.json") and data["stock_sweep"] is None
    # no stock handler for digits: the comparison has Flask only, at the highest level (4; 16 was not run)
    found = data["comparison"]
    assert found["level"] == 4 and "stock_best" not in found and found["vs_flask"] > 0
    assert f"Data: `{data_dir / 'bench-digits.json'}`" in (bench_reports / "bench.md").read_text()


def test_benchmarks_doc_renders_from_the_committed_summaries(bench_reports: Path, tmp_path: Path) -> None:
    out, scaling, reliability = tmp_path / "benchmarks.md", tmp_path / "scaling.md", tmp_path / "reliability.md"
    scaling.write_text((ROOT / "docs" / "scaling.md").read_text())
    reliability.write_text((ROOT / "docs" / "reliability.md").read_text())  # the committed pages stay untouched
    subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "loadtest.render", "--data",
                    str(bench_reports.parent.parent / "data"), "--out", str(out), "--scaling", str(scaling),
                    "--reliability", str(reliability)], cwd=ROOT, check=True)
    text = out.read_text()
    assert "## Side by side" in text and "### digits" in text and "python -m loadtest.bench" in text
    assert "| digits | " in scaling.read_text() and "bench-digits.json` |" in scaling.read_text()  # sized from it


def test_the_stock_handler_is_measured_at_its_best_setting(stock_reports: Path) -> None:
    data = committed(stock_reports / "data", "resnet18")
    sweep = data["stock_sweep"]
    assert sweep["level"] == 2 and [(s["workers"], s["batch_size"]) for s in sweep["settings"]] == [(1, 1), (2, 1)]
    # the threads each stock worker ran with, read from the worker processes while they served: one worker takes
    # every core; two take half each, never every core each (0.6 req/s instead of 12.1 for the detector)
    cores = os.cpu_count() or 1
    one, two = (s["threads_seen"] for s in sweep["settings"])
    assert one == [cores], f"the 1-worker stock setting ran with OMP_NUM_THREADS {one} on {cores} cores"
    assert two == [max(1, cores // 2)] * 2, f"the 2-worker stock setting's workers ran with {two} on {cores} cores"
    best = max((s for s in sweep["settings"] if s.get("qps")), key=lambda s: s["qps"])
    assert sweep["best"] == f"{best['workers']}x{best['batch_size']}"
    stock = [r for r in data["rows"] if r["target"] == "stock"]
    assert [r["level"] for r in stock] == [2] and stock[0]["success_rate"] == 1.0
    threads = best["threads_seen"][0]  # what the best setting's workers ran with
    assert [s["threads"] for s in sweep["settings"]] == [one[0], two[0]]  # the report says what the workers had
    assert stock[0]["setting"] == {"workers": best["workers"], "batch_size": best["batch_size"],
                                   "max_batch_delay": data["model_config"]["maxBatchDelay"], "threads": threads}
    rows = {r["target"]: r for r in data["rows"]}
    found = data["comparison"]
    assert found["level"] == 2 and found["stock_best"]["setting"] == stock[0]["setting"]
    for target, key in (("stock", "stock_best"), ("flask", "flask")):  # tsforge against another server
        assert found[f"vs_{key}"] == round(rows["tsforge"]["qps"] / rows[target]["qps"], 2)
        assert found[f"p99_below_{key}"] == (rows["tsforge"]["latency_ms"]["p99"] < rows[target]["latency_ms"]["p99"])
    table = (stock_reports / "bench" / "resnet18" / "bench.md").read_text()
    plural = "" if best["workers"] == 1 else "s"
    each = f"{threads} torch thread{'' if threads == 1 else 's'} each"
    assert f"best setting ({best['workers']} worker{plural} x batch {best['batch_size']}, {each})" in table
    assert "TorchServe stock handler `image_classifier` settings tried at concurrency 2" in table


def test_the_comparison_takes_concurrency_16_and_each_baselines_own_row() -> None:
    def row(target: str, level: int, qps: float, p99: float) -> dict[str, Any]:
        return {"target": target, "level": level, "qps": qps, "success_rate": 1.0,
                "latency_ms": {"p50": p99 / 2, "p99": p99}}

    rows = [row("tsforge", 16, 150.0, 200.0), row("tsforge", 64, 160.0, 800.0), row("stock", 16, 50.0, 700.0),
            row("stock", 64, 60.0, 2000.0), row("flask", 16, 0.0, 100.0)]
    rows[2]["setting"] = {"workers": 2, "batch_size": 8, "max_batch_delay": 5}
    found = bench.comparison(rows, [16, 64], {"handler_items_per_s": 300.0})
    assert found is not None and found["level"] == 16
    assert (found["vs_stock_best"], found["p99_below_stock_best"]) == (3.0, True)
    assert found["stock_best"]["setting"]["batch_size"] == 8 and found["share_of_ceiling"] == 0.5
    assert found["vs_flask"] is None and found["p99_below_flask"] is False  # no correct answer: no ratio
    assert bench.comparison(rows, [64], None)["level"] == 64  # type: ignore[index]
    assert bench.StockSetting.parse("2x8") == bench.StockSetting(2, 8) and bench.StockSetting(1, 8).name == "1x8"


def test_make_tune_ranks_settings_and_writes_the_best_as_model_config(tmp_path: Path) -> None:
    args = f"--workers 1 --batch-sizes 1,8 --delays 5 --threads 1 --trial 1.5 --warmup 1 --data {tmp_path}/tune.json"
    subprocess.run(["make", "-s", "tune", "MODEL=digits", "P99_MS=5000", "BUDGET=60", f"REPORTS={tmp_path}",
                    f"TUNE_ARGS={args}"], cwd=ROOT, check=True)
    out = tmp_path / "tune" / "digits"
    result = json.loads((out / "tune.json").read_text())
    # the archive's own setting comes first, then the grid; all fit in the budget
    assert 2 <= len(result["trials"]) <= result["grid_size"] == 3
    qps = [t["qps"] for t in result["trials"] if t["feasible"]]
    assert qps == sorted(qps, reverse=True) and result["best"] == result["trials"][0]
    config = yaml.safe_load((out / "model-config.yaml").read_text())
    best = result["best"]["setting"]
    assert config["batchSize"] == best["batch_size"] and config["handler"]["threads"] == best["threads"]
    assert config["maxWorkers"] == best["workers"]
    assert (out / "frontier.png").read_bytes()[:8] == PNG
    table = (out / "tune.md").read_text()
    assert "| rank |" in table and f"Data: `{tmp_path}/tune.json`" in table
    data = json.loads((tmp_path / "tune.json").read_text())  # the committed summary: small, the same ranking
    assert data["schema"] == "tsforge.tune/1" and len((tmp_path / "tune.json").read_bytes()) <= DATA_LIMIT_BYTES
    assert [t["qps"] for t in data["trials"]] == [t["qps"] for t in result["trials"]]
    assert data["best"]["setting"] == best and data["machine"]["cpu_flags"] == result["machine"]["cpu_flags"]
