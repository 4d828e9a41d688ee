"""`make test-gpu`'s on-host script (loadtest/gpu_smoke.py) where there is no GPU: a clear "no CUDA" failure with
its JSON, and the GPU-vs-CPU judgement on answers of each kind. The full `--allow-cpu` dry run (exports, the CUDA
tests skipped, every model served) takes minutes and is run by hand (see its docstring)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from loadtest import gpu_smoke


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a host without CUDA")
def test_without_cuda_the_run_stops_with_no_cuda_and_its_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # set_up changes it for child processes
    empty = tmp_path / "carry"
    empty.mkdir()
    assert gpu_smoke.main(["run", "--carry", str(empty), "--out", str(tmp_path / "out")]) == 1
    summary = json.loads((tmp_path / "out" / "test-gpu.json").read_text())
    assert not summary["ok"] and summary["error"].startswith("no CUDA")
    assert summary["device"]["torch"] == torch.__version__ and summary["device"]["gpus"] == []


def test_gpu_answers_are_judged_against_cpu_fp32_by_their_kind() -> None:
    label = [{"label": "7", "probabilities": {"7": 0.9, "1": 0.1}}] * 10
    flipped = label[:8] + [{"label": "1", "probabilities": {"1": 0.6, "7": 0.4}}] * 2
    assert gpu_smoke.agreement(label, label) == {"cases": 10, "top1_label_agreement": 1.0, "ok": True}
    assert gpu_smoke.agreement(flipped, label)["ok"] is False  # 0.8 < MIN_LABEL_AGREEMENT
    vectors = [{"embedding": [1.0, 0.0]}, {"embedding": [0.0, 1.0]}]
    assert gpu_smoke.agreement(vectors, vectors)["ok"]
    assert not gpu_smoke.agreement([{"embedding": [1.0, 0.1]}], [{"embedding": [1.0, 0.0]}])["ok"]
    outputs = [{"output": [0.5, 1.0]}]
    assert gpu_smoke.agreement(outputs, [{"output": [0.5, 1.01]}])["ok"]
    assert not gpu_smoke.agreement(outputs, [{"output": [0.5, 1.2]}])["ok"]
    assert not gpu_smoke.agreement([None], [None])["ok"]


def test_the_carry_limit_is_the_device_tools(tmp_path: Path) -> None:
    from loadtest import gpu_carry

    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 24)
    assert gpu_carry.size(tmp_path) == 1024 and gpu_carry.LIMIT_BYTES == 64 * 2**20
