"""Export: parity and accuracy are recorded, and a traced program that differs makes export fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from export.exporter import export_model, follow_input_device
from export.models import digits
from export.spec import ExportError, ModelSpec, PreparedModel


@pytest.mark.slow
def test_digits_export_records_parity_and_accuracy(tmp_path: Path) -> None:
    report = export_model(digits.SPEC, tmp_path)
    written = json.loads((tmp_path / "export.json").read_text())
    assert written["parity_max_abs_diff"] == report.parity_max_abs_diff <= 1e-5
    assert written["metrics"]["test_accuracy"] >= 0.95
    assert written["metrics"]["test_images"] == 360
    assert json.loads((tmp_path / "index_to_name.json").read_text())["7"] == "7"
    traced = torch.jit.load(str(tmp_path / "digits.pt"))
    assert traced(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.slow
def test_export_is_deterministic(tmp_path: Path) -> None:
    export_model(digits.SPEC, tmp_path / "a")
    export_model(digits.SPEC, tmp_path / "b")
    a = torch.jit.load(str(tmp_path / "a" / "digits.pt")).state_dict()
    b = torch.jit.load(str(tmp_path / "b" / "digits.pt")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class SignDependent(torch.nn.Module):
    """Data-dependent control flow: tracing records only the branch the example input takes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 3
        return x + 10


def test_injected_mismatch_fails_export_and_writes_nothing(tmp_path: Path) -> None:
    prepared = PreparedModel(module=SignDependent(), example_inputs=(torch.ones(2, 3),),
                             check_inputs=(-torch.ones(2, 3),))
    spec = ModelSpec(name="sign", revision=1, factory=lambda: prepared, handler="handlers/tensor_handler.py")
    with pytest.warns(torch.jit.TracerWarning), pytest.raises(ExportError, match=r"differs from eager output by 12"):
        export_model(spec, tmp_path / "sign")
    assert not (tmp_path / "sign").exists()


def test_declaring_another_module_is_enough(tmp_path: Path) -> None:
    linear = torch.nn.Linear(4, 2).eval()
    spec = ModelSpec(name="linear", revision=3, handler="handlers/tensor_handler.py",
                     factory=lambda: PreparedModel(module=linear, example_inputs=(torch.randn(5, 4),)))
    report = export_model(spec, tmp_path)
    assert report.parity_max_abs_diff <= 1e-6 and (tmp_path / "linear.pt").is_file()


class _Positions(torch.nn.Module):
    """Like transformers' mask code: a tensor made on `x.device`, which a trace records as a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[1], device=x.device)


def test_a_traced_device_follows_the_input(tmp_path: Path) -> None:
    x = torch.zeros(2, 3)
    traced = torch.jit.trace(_Positions(), (x,))  # type: ignore[no-untyped-call]
    assert 'Device = prim::Constant[value="cpu"]' in str(traced.inlined_graph)
    assert follow_input_device(traced) == 1
    traced.save(str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))  # type: ignore[no-untyped-call]
    assert "Device = prim::Constant" not in str(loaded.inlined_graph)
    assert "prim::device" in str(loaded.graph)
    assert torch.equal(loaded(torch.ones(1, 5)), torch.ones(1, 5) + torch.arange(5))  # other shapes still free
    assert follow_input_device(torch.jit.trace(torch.nn.Linear(3, 1), (x,))) == 0  # type: ignore[no-untyped-call]
