"""docs/benchmarks.md, docs/scaling.md and docs/reliability.md are rendered from the committed JSON (docs/data/), never
from markdown: rendered here from small fixture summaries in the schema loadtest/bench.py, tune.py, front_cost.py,
soak.py and the reliability tests' `record` write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from loadtest import gpu_bench, render, render_gpu, render_reliability, soak
from loadtest.bench import SCHEMA
from tests.conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"
MACHINE = {"cpu": "Fixture EPYC 9999", "cores": 2, "cpu_flags": ["avx512_vnni", "avx512_f", "avx2"],
           "memory_gb": 16.0, "gpu": None, "python": "3.11.7", "torch": "2.14.1", "onnxruntime": "1.23.0",
           "torchserve": "0.12.0", "os": "Linux 6.1", "date": "2026-11-27"}


def row(target: str, level: int, qps: float, p99: float, **extra: Any) -> dict[str, Any]:
    return {"target": target, "level": level, "qps": qps, "success_rate": 1.0, "requests": int(qps * 20),
            "latency_ms": {"mean": p99 / 2, "p50": p99 / 2, "p95": p99 * 0.9, "p99": p99},
            "server": {"cpu_percent": 190.0, "frontend": {"peak_rss_mb": 300.0}, "workers": {"peak_rss_mb": 900.0}},
            **extra}


def bench_summary(model: str = "resnet18", qps: float = 150.0) -> dict[str, Any]:
    stock = {"workers": 2, "batch_size": 8, "max_batch_delay": 5}
    rows = [row("tsforge", 1, qps / 3, 40.0), row("tsforge", 16, qps, 200.0),
            row("stock", 1, 20.0, 60.0, setting=stock), row("stock", 16, 45.0, 700.0, setting=stock),
            row("flask", 1, 25.0, 50.0), row("flask", 16, 48.0, 450.0)]
    return {
        "schema": SCHEMA, "model": model, "created": "2026-11-27T06:00:00+00:00", "machine": MACHINE,
        "command": f"python -m loadtest.bench --model {model} --levels 1,16", "levels": [1, 16], "duration_s": 20.0,
        "warmup_s": 10.0, "payloads": {"count": 26, "kinds": ["image/jpeg"], "mean_bytes": 69039},
        "model_config": {"minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 5,
                         "handler": {"precision": "auto", "threads": 1}},
        "rows": rows,
        "comparison": {"level": 16, "tsforge": {"qps": qps, "p50_ms": 100.0, "p99_ms": 200.0, "success_rate": 1.0},
                       "stock_best": {"qps": 45.0, "p50_ms": 350.0, "p99_ms": 700.0, "success_rate": 1.0,
                                      "setting": stock},
                       "vs_stock_best": round(qps / 45.0, 2), "p99_below_stock_best": True,
                       "flask": {"qps": 48.0, "p50_ms": 225.0, "p99_ms": 450.0, "success_rate": 1.0},
                       "vs_flask": round(qps / 48.0, 2), "p99_below_flask": True,
                       "ceiling_items_per_s": 140.0, "share_of_ceiling": round(qps / 140.0, 3)},
        "stock_sweep": {"level": 16, "duration_s": 8.0, "warmup_s": 5.0, "best": "2x8", "settings": [
            {"workers": 1, "batch_size": 1, "qps": 28.0, "p99_ms": 780.0, "success_rate": 1.0},
            {"workers": 2, "batch_size": 8, "qps": 44.0, "p99_ms": 690.0, "success_rate": 1.0},
            {"workers": 2, "batch_size": 1, "error": "the worker died\nOOM"}]},
        "ceiling": {"batch_size": 8, "handler_items_per_s": 140.0, "model_items_per_s": 210.0, "threads": 2},
        "selection": {}, "matrix": None, "notes": [], "raw_report": "reports/bench/resnet18/bench.json",
        "wall_s": 500.0,
    }


def tune_summary() -> dict[str, Any]:
    setting = {"workers": 2, "batch_size": 8, "max_batch_delay": 5, "threads": 1}
    best = {**row("tsforge", 16, 3000.0, 40.0), "setting": setting, "feasible": True}
    return {"schema": "tsforge.tune/1", "model": "digits", "p99_ms": 50.0, "users": 16, "trial_s": 5.0,
            "warmup_s": 20.0, "grid_size": 4, "trials": [best], "best": best,
            "written": "reports/tune/digits/model-config.yaml", "ceiling": {"batch_size": 8,
                                                                           "handler_items_per_s": 5000.0},
            "command": "python -m loadtest.tune --model digits", "machine": MACHINE, "wall_s": 60.0,
            "created": "2026-11-27T07:00:00+00:00"}


def front_summary() -> dict[str, Any]:
    paths = {"direct": {"req_per_s": 130.0, "p50_ms": 100.0, "p99_ms": 200.0, "failed": 0},
             "front": {"req_per_s": 129.0, "p50_ms": 101.0, "p99_ms": 210.0, "failed": 0, "ratio": 0.99},
             "front_binary": {"req_per_s": 110.0, "p50_ms": 120.0, "p99_ms": 250.0, "failed": 0, "ratio": 0.85}}
    return {"schema": "tsforge.serving.front-cost/1", "models": {"resnet18": {**paths, "ratio": 0.99}}, "users": 16,
            "duration_s": 20.0, "rounds": 2, "machine": MACHINE, "created": "2026-11-27T08:00:00+00:00",
            "command": "python -m loadtest.front_cost"}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A data folder with the three kinds of committed JSON and a copy of docs/scaling.md."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "bench-resnet18.json").write_text(json.dumps(bench_summary()))
    (data / "bench-resnet18-matrix.json").write_text(json.dumps(bench_summary(qps=99.0)))  # not the sizing's
    (data / "tune-digits.json").write_text(json.dumps(tune_summary()))
    (data / "front-cost.json").write_text(json.dumps(front_summary()))
    shutil.copy(ROOT / "docs" / "scaling.md", tmp_path / "scaling.md")
    return tmp_path


def rendered(tree: Path) -> tuple[str, str]:
    if not (tree / "reliability.md").exists():  # never the committed page: its block would get the fixture's data
        shutil.copy(ROOT / "docs" / "reliability.md", tree / "reliability.md")
    assert render.main(["--data", str(tree / "data"), "--out", str(tree / "benchmarks.md"),
                        "--scaling", str(tree / "scaling.md"), "--reliability", str(tree / "reliability.md")]) == 0
    return (tree / "benchmarks.md").read_text(), (tree / "scaling.md").read_text()


def test_every_table_names_its_json_and_the_machine_comes_from_it(tree: Path) -> None:
    page, _ = rendered(tree)
    data = tree / "data"
    for name in ("bench-resnet18.json", "bench-resnet18-matrix.json", "tune-digits.json", "front-cost.json"):
        assert f"Data: `{data / name}`" in page, name
    assert page.count("Fixture EPYC 9999, 2 cores (CPU flags: avx512_vnni, avx512_f, avx2)") >= 4
    assert "ONNX Runtime 1.23.0, TorchServe 0.12.0, Linux 6.1; 2026-11-27" in page
    assert (data / "bench-resnet18.png").read_bytes()[:8] == PNG  # the plot beside its JSON, linked from the page
    assert f"![resnet18: throughput vs P99]({data.relative_to(tree)}/bench-resnet18.png)" in page


def test_the_side_by_side_shows_the_stock_handlers_best_setting_and_the_ratios(tree: Path) -> None:
    page, _ = rendered(tree)
    assert "### resnet18 side by side at concurrency 16 (one run)" in page
    assert ("| TorchServe stock handler `image_classifier` at its best setting (2 workers x batch 8) | 45.0 | 350.0 "
            "| 700.0 | 3.33x | yes |") in page  # the handler: derived from the model where the JSON predates it
    assert "| Flask, per-request fp32 | 48.0 | 225.0 | 450.0 | 3.12x | yes |" in page
    assert "| in-process ceiling (decode + infer + encode, no server) | 140.0 items/s |" in page
    assert "| TorchServe stock handler `image_classifier`, best setting (2 workers x batch 8) | 16 | 45.0 |" in page
    assert "| 2 x 8 (best) | 44.0 | 690.0 | 100.0% |" in page and "| 2 x 1 | does not run: OOM |" in page
    goal = ("resnet18: tsforge >= 3x TorchServe stock handler `image_classifier` at its best setting at concurrency "
            "16, lower P99")
    assert f"| {goal} | 3.33x, P99 200.0 vs 700.0 ms | yes | `{tree / 'data' / 'bench-resnet18.json'}` |" in page
    assert "| 0.99 |" in page and "## The v2 front's cost" in page  # front-cost.json
    assert "| 1 | 2 | 8 | 5 | 1 | 3000.0 |" in page  # tune-digits.json


def test_scaling_is_rendered_from_the_same_json_the_sizing_reads(tree: Path) -> None:
    _, scaling = rendered(tree)
    before, block = scaling.split(render.SCALING_BEGIN)
    block, after = block.split(render.SCALING_END)
    original = (ROOT / "docs" / "scaling.md").read_text()
    assert original.startswith(before) and original.endswith(after)  # the prose around the block is kept
    # capacity's rule on the fixture: 150 req/s at 16 is the best, 50 at 1 is under 90 % of it
    source = tree / "data" / "bench-resnet18.json"
    assert f"| resnet18 | 16 | 150.0 req/s | 200.0 ms | 2 cores / 1536 MiB | `{source}` |" in block
    assert "| 1,000 req/s | 10 (20) |" in block  # ceil(1000 / (0.7 x 150)) = 10 replicas of 2 cores
    assert "1000 / (0.7 x 150.0) = 9.5, so 10 replicas" in block and "69,039 bytes on average" in block
    assert "Fixture EPYC 9999" in block and "99.0" not in block  # bench-resnet18-matrix.json is another run
    # the data changes, the page follows: nothing to keep in step by hand
    (tree / "data" / "bench-resnet18.json").write_text(json.dumps(bench_summary(qps=300.0)))
    _, again = rendered(tree)
    assert "| resnet18 | 16 | 300.0 req/s |" in again and again.count(render.SCALING_BEGIN) == 1


def test_scaling_without_data_says_so_and_a_page_without_the_block_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "docs" / "scaling.md", tmp_path / "scaling.md")
    _, scaling = rendered(tmp_path)
    assert "No committed `make bench` summary" in scaling and "req/s |" not in scaling.split(render.SCALING_END)[0]
    (tmp_path / "scaling.md").write_text("# hand-written\n")
    with pytest.raises(SystemExit, match="no generated block"):
        rendered(tmp_path)


def test_the_committed_scaling_page_is_what_the_committed_data_renders(tmp_path: Path) -> None:
    """docs/scaling.md cannot drift from docs/data/: `make benchmarks-doc` after each bench keeps them equal."""
    shutil.copy(ROOT / "docs" / "scaling.md", tmp_path / "scaling.md")
    data = ROOT / "docs" / "data"
    render.render_scaling(tmp_path / "scaling.md", render.read_reports(list(data.glob("bench-*.json"))), data)
    assert (tmp_path / "scaling.md").read_text() == (ROOT / "docs" / "scaling.md").read_text()


def scenario(name: str, figures: dict[str, Any]) -> dict[str, Any]:
    """A reliability scenario's file as tests/test_reliability.py's `record` writes it."""
    test = f"tests/test_reliability.py::test_{name}"
    return {"schema": "tsforge.reliability/1", "scenario": name, "created": "2026-11-28T09:00:00+00:00",
            "test": test, "command": f"pytest {test}", "machine": MACHINE, "figures": figures}


def soak_summary() -> dict[str, Any]:
    """A soak's committed summary, made by loadtest/soak.py's own `data_summary` from a run's summary."""
    processes = {"frontend": {"label": "frontend", "baseline_mb": 356.2, "final_mb": 356.0, "peak_mb": 360.1,
                              "growth_pct": -0.06},
                 "digits/11": {"label": "digits worker 1 (pid 11)", "baseline_mb": 551.0, "final_mb": 551.0,
                               "peak_mb": 552.0, "growth_pct": 0.0}}
    run = {"created": "2026-11-28T10:00:00+00:00", "machine": {**MACHINE, "cpu": "Soak Xeon 1234"},
           "warmup_fraction": 0.1, "interval_s": 2.0, "samples": [{"t": 0.0}] * 50,
           "models": {"digits": {"requests": 100_000, "failed": 0, "failure_reasons": {}, "users": 16,
                                 "seconds": 153.4, "rate": 652.0}},
           "rss": {"warm_from_s": 12.0, "processes": processes}}
    return soak.data_summary(run, "python -m loadtest.soak --digits-requests 100000", Path("reports/soak/soak.json"))


def reliability_block(page: Path) -> tuple[str, str, str]:
    text = page.read_text()
    before, rest = text.split(render_reliability.BEGIN)
    block, after = rest.split(render_reliability.END)
    return before, block, after


def test_the_reliability_block_has_each_scenarios_figures_its_json_and_machine(tree: Path) -> None:
    folder = tree / "data" / "reliability"
    folder.mkdir()
    (folder / "worker_killed.json").write_text(json.dumps(scenario("worker_killed", {
        "requests": 15666, "failed": 8, "failures": {"HTTP 500": 8}, "first_200_after_kill_s": 0.011,
        "worker_replaced_s": 5.6, "bound_s": 10.0})))
    (folder / "flood.json").write_text(json.dumps(scenario("flood", {
        "requests": 400, "answered_200": 19, "answered_503": 381, "first_503_ms": 16.7, "p50_503_ms": 151.0,
        "max_503_ms": 170.2, "job_queue_size": 16, "bound_ms": 50.0})))
    (folder / "new_fault.json").write_text(json.dumps(scenario("new_fault", {"recovered_s": 1.5})))
    (tree / "data" / "soak.json").write_text(json.dumps(soak_summary()))
    rendered(tree)
    before, block, after = reliability_block(tree / "reliability.md")
    original = (ROOT / "docs" / "reliability.md").read_text()
    assert original.startswith(before) and original.endswith(after)  # scenarios, bounds and commands kept
    reliability = tree / "data" / "reliability"
    assert (f"| worker killed (SIGKILL) under load | 15,666 requests, 8 failed (HTTP 500: 8); the next right answer "
            f"0.011 s after the kill; replacement worker ready 5.6 s after it | `{reliability / 'worker_killed.json'}` "
            "| 2026-11-27, machine 1 |") in block
    assert "19 answered `200`, 381 `503`; first 503 16.7 ms after it was sent" in block
    assert f"| new fault | recovered_s 1.5 | `{reliability / 'new_fault.json'}` |" in block  # not known: still shown
    assert "| hang_ups" not in block  # a known scenario without its file: its row says so
    assert ("| clients hanging up | no committed JSON yet: `make reliability-data` "
            f"| `{reliability / 'hang_ups.json'}` (missing) | - |") in block
    assert ("| soak | digits 100,000 requests, 0 failed; RSS growth after warm-up (bound 5 % per process): "
            "frontend -0.06 % (356.0 MB), digits worker 1 (pid 11) +0.00 % (551.0 MB); digits 652.0 req/s; "
            f"verdict: pass | `{tree / 'data' / 'soak.json'}` | 2026-11-27, machine 2 |") in block
    assert "Machine 1: Fixture EPYC 9999, 2 cores (CPU flags: avx512_vnni, avx512_f, avx2)" in block
    assert "Machine 2: Soak Xeon 1234, 2 cores" in block and "Machine 3" not in block
    assert "no committed JSON yet: `make bench-startup`" in block  # the fixture has no startup.json


def test_the_reliability_block_without_data_says_so_and_invents_nothing(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "docs" / "scaling.md", tmp_path / "scaling.md")
    rendered(tmp_path)
    _, block, _ = reliability_block(tmp_path / "reliability.md")
    rows = [line for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(render_reliability.SCENARIOS) + 2  # the scenarios, the soak, worker start
    assert all("no committed JSON yet" in row and "(missing)" in row for row in rows), rows
    assert "No reliability data committed yet" in block and "Machine 1" not in block
    assert not any(char.isdigit() for row in rows for char in row.split(" | ")[1]), rows  # no figure at all
    (tmp_path / "reliability.md").write_text("# hand-written\n")
    with pytest.raises(SystemExit, match="no generated block"):
        rendered(tmp_path)


def test_rendering_the_reliability_block_twice_changes_nothing(tree: Path) -> None:
    (tree / "data" / "soak.json").write_text(json.dumps(soak_summary()))
    rendered(tree)
    once = (tree / "reliability.md").read_text()
    rendered(tree)
    assert (tree / "reliability.md").read_text() == once and once.count(render_reliability.BEGIN) == 1


def test_a_scenario_the_tests_record_renders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reliability tests' `record` writes where TSFORGE_RELIABILITY_DATA says, what the renderer reads."""
    from tests.test_reliability import FIGURES, figures_dir, record

    monkeypatch.delenv("TSFORGE_RELIABILITY_DATA", raising=False)
    assert figures_dir() == FIGURES == ROOT / "reports" / "reliability"  # by default never docs/data
    monkeypatch.setenv("TSFORGE_RELIABILITY_DATA", str(tmp_path / "data" / "reliability"))
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/test_reliability.py::test_hang_up (call)")
    written = record("hang_ups", {"connections": 600, "worker_rss_before_mb": 1103.2, "worker_rss_after_mb": 1103.5,
                                  "growth_pct": 0.03})
    assert written == tmp_path / "data" / "reliability" / "hang_ups.json"
    saved = json.loads(written.read_text())
    assert saved["command"] == "pytest tests/test_reliability.py::test_hang_up" and saved["machine"]["cores"]
    block = render_reliability.markdown(tmp_path / "data")
    assert f"| clients hanging up | 600 connections hung up; worker RSS 1103.2 → 1103.5 MB (+0.03 %) | `{written}` |" \
        in block


def test_the_committed_reliability_page_is_what_the_committed_data_renders(tmp_path: Path) -> None:
    """docs/reliability.md cannot drift from docs/data/: `make benchmarks-doc` after each run keeps them equal."""
    shutil.copy(ROOT / "docs" / "reliability.md", tmp_path / "reliability.md")
    render_reliability.render(tmp_path / "reliability.md", ROOT / "docs" / "data")
    assert (tmp_path / "reliability.md").read_text() == (ROOT / "docs" / "reliability.md").read_text()


# ---- every committed page is a render of docs/data --------------------------------------------------------------

def fresh_render(tmp_path: Path) -> Path:
    """docs/data rendered into tmp_path as `make benchmarks-doc` lays the pages out (the plots in tmp_path/data, so
    the page links them as docs/benchmarks.md does), from another working directory; docs/ is not written."""
    for page in ("scaling.md", "reliability.md"):
        shutil.copy(ROOT / "docs" / page, tmp_path / page)
    assert render.main(["--data", str(ROOT / "docs" / "data"), "--out", str(tmp_path / "benchmarks.md"),
                        "--scaling", str(tmp_path / "scaling.md"), "--reliability", str(tmp_path / "reliability.md"),
                        "--plots", str(tmp_path / "data")]) == 0
    return tmp_path


PAGES = ("benchmarks.md", "benchmarks-gpu.md", "scaling.md", "reliability.md")


def test_every_rendered_page_equals_a_fresh_render_of_docs_data(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/benchmarks.md, docs/benchmarks-gpu.md and the generated blocks of docs/scaling.md and docs/reliability.md
    are what docs/data renders: after a new run, `make benchmarks-doc`, and commit the data with the pages."""
    committed = {page: (ROOT / "docs" / page).read_text() for page in PAGES}
    monkeypatch.chdir(tmp_path)  # nothing depends on where it runs from
    (tmp_path / "out").mkdir()
    fresh = fresh_render(tmp_path / "out")
    for page in PAGES:
        assert (fresh / page).read_text() == committed[page], (
            f"docs/{page} differs from a render of docs/data: run `make benchmarks-doc`")
        assert (ROOT / "docs" / page).read_text() == committed[page]  # the check rewrote no committed page
    assert committed["benchmarks-gpu.md"] in committed["benchmarks.md"]  # the GPU page, included whole


def test_rendering_depends_on_the_data_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two renders of the same data at different times, time zones and working directories give the same pages."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fresh_render(tmp_path / "a")
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    monkeypatch.chdir(tmp_path / "b")
    fresh_render(tmp_path / "b")
    for page in PAGES:
        assert (tmp_path / "a" / page).read_text() == (tmp_path / "b" / page).read_text(), page


def test_every_baseline_row_names_the_stock_handler_it_ran(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    named = ("`object_detector`", "`image_segmenter`", "`image_classifier`", "(the text classifier example, ")
    lines = [line for line in page.splitlines() if "TorchServe stock handler" in line and "|" in line]
    assert lines and all(any(name in line for name in named) for line in lines), [
        line for line in lines if not any(name in line for name in named)]
    for name, model in zip(named, ("detector", "segmenter", "resnet18", "sentiment"), strict=True):
        assert f"| {model}: tsforge >= 3x TorchServe stock handler {name}" in page
    # what the bench recorded wins over what the model maps to
    summary = bench_summary()
    for row in summary["rows"]:
        if row["target"] == "stock":
            row["stock_handler"] = "recorded_handler"
    assert "TorchServe stock handler `recorded_handler`, best setting" in render.bench_markdown(summary)


# ---- the GPU page ------------------------------------------------------------------------------------------------

def test_every_gpu_figure_names_its_torch_and_gpu_and_nothing_missing_is_invented() -> None:
    page = render_gpu.page(ROOT / "docs" / "data")
    sections = page.split("\n### ")[1:]
    assert len(sections) == len(list((ROOT / "docs" / "data").glob("gpu-*.json"))) + 1  # + make test-gpu
    for section in sections:
        title = section.splitlines()[0]
        assert " on NVIDIA H200, torch " in title, title
    resnet = next(s for s in sections if s.startswith("resnet50 on"))
    assert resnet.startswith("resnet50 on NVIDIA H200, torch 2.11.0+cu130")
    assert "| tsforge, as archived | 256 | 8,843 | 28.8 | 37.0 | 100% | 84.9 | 86 | 779 |" in resnet
    assert "| stock `image_classifier` (4 workers x 32, 10 ms, fp32, Pillow) | 16 | 70 | 119 | 5,258 |" in resnet
    assert ">= 100x the stock handler at 256: met (691x)" in resnet
    minilm = next(s for s in sections if s.startswith("minilm on"))
    assert minilm.startswith("minilm on NVIDIA H200, torch not recorded")  # the page never said which torch
    assert "run not recorded" in minilm and "client processes: not recorded" in minilm


def test_a_gpu_bench_run_writes_what_the_gpu_page_renders(tmp_path: Path) -> None:
    """gpu_bench's committed summary has the shape of the transcribed runs: a new run re-renders the page."""
    row = {"target": "tsforge", "level": 16, "qps": 1200.5, "requests": 18000, "failures": 0, "success_rate": 1.0,
           "latency_ms": {"mean": 12.0, "p50": 11.5, "p95": 15.0, "p99": 17.4, "max": 30.0},
           "gpu": {"util_percent_mean": 11.0, "util_percent_max": 20.0, "memory_used_mib_max": 9000.0,
                   "samples": 30}, "client": {"cpu_percent": 14.0, "processes": 8},
           "server": {"cpu_percent": 81.0, "cores": 16}, "torchserve": {"bulk": True}}
    stock = {**row, "target": "stock", "qps": 60.0, "stock_handler": "image_classifier"}
    result = {"model": "resnet50", "unit": "img", "created": "2026-12-01T00:00:00+00:00",
              "command": "python -m loadtest.gpu_bench --levels 16", "machine": {**MACHINE, "gpu": "Fixture GPU",
                                                                               "torchvision": "0.29.1"},
              "archive_config": {"maxWorkers": 8, "batchSize": 32, "maxBatchDelay": 5},
              "handler_config": {"precision": "fp16"}, "levels": [16], "duration_s": 15.0, "warmup_s": 8.0,
              "clients": 8, "gpu_sample_interval_s": 0.5,
              "stock": {"handler": "image_classifier", "config": {"maxWorkers": 4, "batchSize": 32,
                                                                  "maxBatchDelay": 10},
                        **gpu_bench.STOCK_FACTS, "duration_s": 15.0, "warmup_s": 5.0},
              "payloads": {"count": 32, "kinds": ["image/jpeg"], "mean_bytes": 61000,
                           "description": gpu_bench.PAYLOADS["img"]},
              "ceiling": {"batch_size": 32, "handler_b32_items_per_s": 5000.0, "handler_items_per_s": 5000.0},
              "parity": {"served": {"cases": 32, "top1_label_agreement": 1.0}}, "notes": [], "gpu_scaling": {},
              "wall_s": 100.0, "rows": [row, stock], "ratios": {16: 20.0},
              "gpu_memory_per_process_mib": {"tsforge": {"start_mib": {11: 1170.0, 12: 1176.0},
                                                         "end_mib": {11: 1176.0, 12: 1182.0}}}}
    data = gpu_bench.data_summary(result, tmp_path / "gpu-bench.json")
    transcribed = json.loads((ROOT / "docs" / "data" / "gpu-resnet50.json").read_text())
    assert set(data) - {"raw_report", "gpu_scaling", "wall_s"} == set(transcribed)  # one shape, old runs and new
    assert set(data["rows"][0]) >= set(transcribed["rows"][0]) and "torchserve" not in data["rows"][0]
    assert data["gpu_memory_per_worker_mib"] == {"tsforge": {"after_warmup": [1170.0, 1176.0],
                                                             "after_run": [1176.0, 1182.0]}}
    (tmp_path / "gpu-resnet50.json").write_text(json.dumps(data))
    page = render_gpu.page(tmp_path)
    assert "### resnet50 on Fixture GPU, torch 2.14.1 (" in page and "; run 2026-11-27" in page
    assert "| tsforge, as archived (8 workers x 32, 5 ms, fp16) | 16 | 1,200.5 | 11.5 | 17.4 |" in page
    assert "| stock `image_classifier` (4 workers x 32, 10 ms, fp32, Pillow) | 16 | 60.0 |" in page
    assert "tsforge / stock in the same run: 20.0x at concurrency 16." in page
