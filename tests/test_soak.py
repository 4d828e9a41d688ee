"""`make soak` in miniature: a few hundred digits requests, so the soak script cannot rot; its table from made-up
samples."""

from __future__ import annotations

import json
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


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_short_soak_writes_its_json_plot_and_table(tmp_path: Path) -> None:
    built_archive("digits")
    soak.main(["--digits-requests", "600", "--resnet18-requests", "0", "--interval", "0.2", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["models"]["digits"] == {**summary["models"]["digits"], "requests": 600, "failed": 0}
    processes = summary["rss"]["processes"]
    assert "frontend" in processes and len([p for p in processes if p.startswith("digits/")]) == 2
    assert len(summary["samples"]) >= 3 and (tmp_path / "soak.png").stat().st_size > 10_000
    table = (tmp_path / "soak.md").read_text()
    assert "| frontend |" in table and "| digits worker 1 (pid " in table and "| digits worker 2 (pid " in table
    assert not (tmp_path / "serve" / "torchserve.pid").exists()  # the soak's TorchServe was stopped
