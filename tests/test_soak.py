"""`make soak` in miniature: a few hundred digits requests, so the soak script cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import soak
from tests.conftest import built_archive

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
def test_a_short_soak_writes_its_json_plot_and_table(tmp_path: Path) -> None:
    built_archive("digits")
    soak.main(["--digits-requests", "600", "--resnet18-requests", "0", "--interval", "0.2", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["models"]["digits"] == {**summary["models"]["digits"], "requests": 600, "failed": 0}
    processes = summary["rss"]["processes"]
    assert "frontend" in processes and len([p for p in processes if p.startswith("digits/")]) == 2
    assert len(summary["samples"]) >= 3 and (tmp_path / "soak.png").stat().st_size > 10_000
    assert "| frontend |" in (tmp_path / "soak.md").read_text()
    assert not (tmp_path / "serve" / "torchserve.pid").exists()  # the soak's TorchServe was stopped
