"""Workers per GPU (tsforge/serving/gpus.py): the archive carries one GPU's worth, the server start multiplies it by the
GPUs it counts and tells TorchServe that count. The GPU count is replaced here (this machine has none); the
scaling itself runs against a real TorchServe."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import BUILD, ROOT, StartServer, built_archive
from tsforge.packaging import archive
from tsforge.serving import gpus
from tsforge.serving.server import read_properties

RESNET50 = ROOT / "config" / "models" / "resnet50.yaml"


def mar_with(path: Path, config: dict[str, object]) -> Path:
    with zipfile.ZipFile(path, "w") as mar:
        mar.writestr("model-config.yaml", yaml.safe_dump(config))
    return path


def test_the_archive_packages_one_gpus_worth_and_keeps_the_per_gpu_count() -> None:
    shipped = yaml.safe_load(RESNET50.read_text())
    per_gpu = shipped["gpu"][gpus.PER_GPU_KEY]
    text, changed = archive.model_config(RESNET50, "gpu")
    packaged = yaml.safe_load(text)
    assert packaged["minWorkers"] == packaged["maxWorkers"] == per_gpu == changed["minWorkers"]
    assert gpus.PER_GPU_KEY not in changed and packaged["gpu"] == shipped["gpu"]  # read again at server start
    assert gpus.per_gpu(packaged) == per_gpu


def test_worker_plan_multiplies_by_the_gpus_and_totals_switch_it_off(tmp_path: Path) -> None:
    mar_with(tmp_path / "a.mar", {"minWorkers": 8, "gpu": {"workers_per_gpu": 8}})
    mar_with(tmp_path / "b.mar", {"gpu": {"minWorkers": 5, "maxWorkers": 5, "workers_per_gpu": 8}})  # totals
    mar_with(tmp_path / "c.mar", {"minWorkers": 1})
    models = ["a=a.mar", "b", "c", "missing"]
    assert gpus.worker_plan(tmp_path, models, 0) == {}
    assert gpus.worker_plan(tmp_path, models, 1) == {"a": 8}
    assert gpus.worker_plan(tmp_path, models, 4) == {"a": 32}
    for bad in (0, -1, "8", True):
        with pytest.raises(ValueError, match="workers_per_gpu must be a positive integer"):
            gpus.per_gpu({"gpu": {"workers_per_gpu": bad}})


def test_a_bad_per_gpu_count_stops_the_archive_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"minWorkers": 1, "gpu": {"workers_per_gpu": "eight"}}))
    with pytest.raises(SystemExit, match=r"bad\.yaml: gpu\.workers_per_gpu must be a positive integer"):
        archive.model_config(config, "gpu")


def test_gpus_are_counted_not_assumed(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.visible_gpus() == 0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpus.visible_gpus() == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert gpus.visible_gpus("0") == 0


@pytest.mark.integration
def test_the_server_start_scales_to_workers_per_gpu_times_the_gpus(start_server: StartServer, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """digits archived with `gpu: {workers_per_gpu: 1}` on a host said to have 2 GPUs: 2 workers, all READY
    before the start returns, and TorchServe told number_of_gpu (which it caps at what it finds itself: 0 here)."""
    built_archive("digits")
    config = yaml.safe_load((ROOT / "config" / "models" / "digits.yaml").read_text())
    config["gpu"] = {"workers_per_gpu": 1}
    config_file = tmp_path / "digits.yaml"
    config_file.write_text(yaml.safe_dump(config))
    store = tmp_path / "store"
    archive.build(archive.plan("digits", build_dir=BUILD, store=store, config_file=config_file, device="gpu"))
    monkeypatch.setattr(gpus, "visible_gpus", lambda cap=None: 2)
    server = start_server(["digits"], store=store)
    described = requests.get(f"{server.url('management')}/models/digits", timeout=10).json()[0]
    assert described["minWorkers"] == described["maxWorkers"] == 2
    assert [w["status"] for w in described["workers"]] == ["READY", "READY"]
    assert read_properties(server.run_dir / "config.properties")[gpus.GPU_COUNT_KEY] == "2"
    server.stop()
