"""`make bench` and `make tune` smoke runs: the reports are written, well-formed and renderable."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reports = tmp_path_factory.mktemp("reports")
    subprocess.run(["make", "-s", "bench", "MODEL=digits", "LEVELS=1,4", "DURATION=2",
                    "BENCH_ARGS=--warmup 1 --matrix", f"REPORTS={reports}"], cwd=ROOT, check=True)
    return reports / "bench" / "digits"


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
    assert all(r["qps_vs_tsforge"] == 1.0 for r in result["rows"] if r["target"] == "tsforge")
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


def test_benchmarks_doc_renders_from_the_reports(bench_reports: Path, tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "loadtest.render", "--bench",
                    str(bench_reports / "bench.json"), "--out", str(out)], cwd=ROOT, check=True)
    text = out.read_text()
    assert "## Side by side" in text and "### digits" in text and "python -m loadtest.bench" in text


def test_make_tune_ranks_settings_and_writes_the_best_as_model_config(tmp_path: Path) -> None:
    args = "--workers 1 --batch-sizes 1,8 --delays 5 --threads 1 --trial 1.5 --warmup 1"
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
    assert "| rank |" in (out / "tune.md").read_text()
