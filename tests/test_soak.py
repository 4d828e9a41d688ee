"""`make soak` in miniature: a few hundred digits requests, so the soak script cannot rot, and its verdict must be a
pass; its table and its bound (RSS growth after warm-up at most 5 %, no failed request) from made-up samples."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loadtest import soak
from tests.conftest import built_archive


def sample(t: float, rss: dict[str, float], done: int) -> dict[str, Any]:
    return {"t": t, "rss_mb": rss, "done": {"digits": done, "resnet18": done}}


def test_the_table_has_one_row_per_process_and_per_model() -> None:
    """Two ResNet-18 workers are two rows told apart by number and PID, never one row printed twice; a worker
    that replaced another gets its own row after it."""
    both = {"frontend": 300.0, "digits/11": 550.0, "resnet18/21": 610.0, "resnet18/22": 611.0}
    samples = [sample(t, both, 100 * t) for t in range(10)]
    samples += [sample(t, {"frontend": 300.0, "digits/11": 550.0, "resnet18/21": 610.0, "resnet18/23": 612.0},
                       100 * t) for t in range(10, 20)]
    progress = {m: soak.Progress(target=2000, done=2000) for m in ("digits", "resnet18")}
    summary = {"rss": soak.growth(samples, progress, warmup=0.1),
               "models": {m: {"requests": 2000, "failed": 0, "seconds": 1.0, "rate": 2000.0} for m in progress}}
    rows = [line for line in soak.table(summary).splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == len(set(rows))
    assert [row.split(" | ")[0] for row in rows] == [
        "| process", "| frontend", "| digits worker 1 (pid 11)", "| resnet18 worker 1 (pid 21)",
        "| resnet18 worker 2 (pid 22)", "| resnet18 worker 3 (pid 23)", "| model", "| digits", "| resnet18"]


def made_up(worker_mb: Callable[[int], float], failed: int = 0) -> dict[str, Any]:
    """A summary as `run` returns it, from 20 samples of a flat frontend and one digits worker whose RSS at sample
    t is worker_mb(t); the soak is warm from t = 1 (100 of 1000 requests)."""
    samples = [{"t": float(t), "rss_mb": {"frontend": 300.0, "digits/11": worker_mb(t)}, "done": {"digits": 100 * t}}
               for t in range(20)]
    rss = soak.growth(samples, {"digits": soak.Progress(target=1000, done=1000, failed=failed)}, warmup=0.1)
    return {"rss": rss, "samples": samples,
            "models": {"digits": {"requests": 1000, "failed": failed, "failure_reasons": {"HTTP 503": failed} if
                                  failed else {}, "seconds": 1.0, "rate": 1000.0}}}


@pytest.mark.parametrize(("name", "worker_mb", "failed", "code"), [
    ("flat", lambda t: 500.0 + 0.25 * t, 0, 0),  # +0.9 %
    ("grows only during warm-up", lambda t: 400.0 if t == 0 else 500.0, 0, 0),
    ("grows 9 % after warm-up", lambda t: 500.0 + 2.5 * t, 0, 1),
    ("flat, one request failed", lambda t: 500.0, 1, 1),
])
def test_the_soak_fails_on_growth_over_the_bound_or_a_failed_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, worker_mb: Callable[[int], float], failed: int,
        code: int) -> None:
    summary = made_up(worker_mb, failed)
    monkeypatch.setattr(soak, "run", lambda *args: summary)  # main's verdict on these samples, no server
    assert soak.main(["--out", str(tmp_path)]) == code, summary["rss"]
    problems = soak.verdict(summary)
    assert len(problems) == code
    if name == "grows 9 % after warm-up":
        assert problems[0].startswith("digits worker 1 (pid 11): RSS grew +8.96 %"), problems


def test_the_committed_summary_has_the_growth_the_verdict_and_the_machine_but_no_samples(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--data` (make soak: docs/data/soak.json) writes the small summary docs/reliability.md is rendered from; by
    default it goes beside the raw report, never into docs/data."""
    summary = {**made_up(lambda t: 500.0 + 2.5 * t, failed=1), "created": "2026-11-28T10:00:00+00:00",
               "machine": {"cpu": "Fixture", "cores": 2}, "warmup_fraction": 0.1, "interval_s": 1.0}
    monkeypatch.setattr(soak, "run", lambda *args: summary)
    assert soak.main(["--out", str(tmp_path / "raw"), "--data", str(tmp_path / "soak.json")]) == 1
    data = json.loads((tmp_path / "soak.json").read_text())
    assert data["schema"] == soak.SCHEMA and data["machine"] == {"cpu": "Fixture", "cores": 2}
    assert data["command"] == f"python -m loadtest.soak --out {tmp_path / 'raw'} --data {tmp_path / 'soak.json'}"
    assert data["goal_pct"] == soak.GOAL_PCT and data["samples"] == 20 and '"rss_mb"' not in json.dumps(data)
    assert data["rss"]["processes"]["digits/11"]["growth_pct"] == 8.96 and data["max_growth_pct"] == 8.96
    assert data["models"]["digits"] == {"requests": 1000, "failed": 1, "users": None, "seconds": 1.0,
                                        "rate": 1000.0, "failure_reasons": {"HTTP 503": 1}}
    assert data["verdict"] == "fail" and data["problems"] == soak.verdict(summary)
    assert soak.main(["--out", str(tmp_path / "raw")]) == 1
    assert json.loads((tmp_path / "raw" / "soak-summary.json").read_text())["verdict"] == "fail"


def test_a_soak_that_measured_nothing_does_not_pass() -> None:
    summary = {"rss": {"warm_from_s": 0.0, "processes": {}}, "models": {}}
    assert soak.verdict(summary) == ["no process had two RSS samples after warm-up"]


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_short_soak_passes_and_writes_its_json_plot_and_table(tmp_path: Path) -> None:
    built_archive("digits")
    code = soak.main(["--digits-requests", "600", "--resnet18-requests", "0", "--interval", "0.2",
                      "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert code == 0, (soak.verdict(summary), (tmp_path / "soak.md").read_text())
    assert summary["max_growth_pct"] <= soak.GOAL_PCT
    assert summary["models"]["digits"] == {**summary["models"]["digits"], "requests": 600, "failed": 0}
    processes = summary["rss"]["processes"]
    assert "frontend" in processes and len([p for p in processes if p.startswith("digits/")]) == 2
    assert len(summary["samples"]) >= 3 and (tmp_path / "soak.png").stat().st_size > 10_000
    table = (tmp_path / "soak.md").read_text()
    assert "| frontend |" in table and "| digits worker 1 (pid " in table and "| digits worker 2 (pid " in table
    assert not (tmp_path / "serve" / "torchserve.pid").exists()  # the soak's TorchServe was stopped
