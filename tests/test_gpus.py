"""Workers per GPU (tsforge/serving/gpus.py): the archive carries one GPU's worth, the server start (`make serve`, the
KServe pod) multiplies it by the GPUs it counts and tells TorchServe that count; the KServe bundle gives its GPU runtime
the `gpu:` settings and its CPU runtime the CPU ones, whatever host packaged the archive. GPUs are faked here
(TSFORGE_FAKE_GPUS, and CUDA_VISIBLE_DEVICES for TorchServe's own count); the plan is read back from a real
TorchServe, whose workers, finding no CUDA, run on the CPU."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import BUILD, ROOT, StartServer, built_archive
from tsforge.kube import kserve
from tsforge.packaging import archive
from tsforge.serving import gpus
from tsforge.serving.server import TorchServe, read_properties

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
    monkeypatch.delenv(gpus.FAKE_GPUS_ENV, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.visible_gpus() == 0


def test_fake_gpus_are_counted_as_cuda_would_see_them_and_said_so(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(gpus.FAKE_GPUS_ENV, "4")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with caplog.at_level(logging.WARNING, logger=gpus.__name__):
        assert gpus.visible_gpus() == 4
    assert "TSFORGE_FAKE_GPUS=4: counting 4 fake GPU(s)" in caplog.text
    assert gpus.visible_gpus("2") == 2  # the profile's number_of_gpu caps it
    for visible, seen in (("1,3", 2), ("0,9,1", 1), ("2,2", 1), ("", 0), ("-1", 0), ("0,1,2,3", 4)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert gpus.visible_gpus() == seen, visible
    monkeypatch.setenv(gpus.FAKE_GPUS_ENV, "two")
    with pytest.raises(ValueError, match="TSFORGE_FAKE_GPUS must be a number of fake GPUs; got 'two'"):
        gpus.visible_gpus()


def refuse_to_start(*args: object, **kwargs: object) -> None:
    raise OSError("not started")


def test_the_plan_multiplies_the_fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What TorchServe.start renders and plans: number_of_gpu = the GPUs counted, workers = 3 per GPU x 2 (the
    model started with --models, and one registered only by the profile's model_snapshot, as in the pod)."""
    mar_with(tmp_path / "a.mar", {"minWorkers": 1, "gpu": {"workers_per_gpu": 3}})
    mar_with(tmp_path / "b-1.mar", {"minWorkers": 1, "gpu": {"workers_per_gpu": 3}})
    monkeypatch.setenv(gpus.FAKE_GPUS_ENV, "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(subprocess, "Popen", refuse_to_start)
    profile = tmp_path / "profile.properties"
    for models, snapshot, planned in ((["a=a.mar"], "", {"a": 6}),
                                      ([], '{"models":{"b":{"1":{"defaultVersion":true,"marName":"b-1.mar"}}}}',
                                       {"b": 6})):
        profile.write_text(f"model_snapshot={snapshot}\n" if snapshot else "")
        server = TorchServe(config=profile, run_dir=tmp_path / "run", model_store=tmp_path, models=models)
        with pytest.raises(OSError, match="not started"):
            server.start()
        assert server._scaling == planned
        assert read_properties(server.run_dir / "config.properties")[gpus.GPU_COUNT_KEY] == "2"


RESNET50_CPU = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 20, "responseTimeout": 60}
RESNET50_GPU = {"minWorkers": 8, "maxWorkers": 8, "batchSize": 32, "maxBatchDelay": 5, "responseTimeout": 60}


def test_each_device_s_settings_read_back_whatever_host_packaged_the_archive() -> None:
    for packaged_on in ("cpu", "gpu"):
        packaged = yaml.safe_load(archive.model_config(RESNET50, packaged_on)[0])
        for device, expected in (("cpu", RESNET50_CPU), ("gpu", RESNET50_GPU)):
            settings = gpus.device_settings(packaged, device)
            assert {k: settings[k] for k in expected} == expected, (packaged_on, device)


def test_the_kserve_runtimes_get_their_own_devices_settings(tmp_path: Path) -> None:
    """One bundle per host kind the archive was packaged on: the CPU runtime's config.properties registers resnet50
    with the CPU settings, the GPU runtime's config-gpu.properties with the gpu: ones, and each runtime's pod is told
    its device."""
    from tests.test_kserve import fake_archive

    for packaged_on in ("cpu", "gpu"):
        store, out = tmp_path / packaged_on / "store", tmp_path / packaged_on / "out"
        store.mkdir(parents=True)
        fake_archive(store, "resnet50", yaml.safe_load(archive.model_config(RESNET50, packaged_on)[0]))
        kserve.write_bundle(out, kserve.select_archives(store, None), "pvc://m", "image", 2, {})
        for device, expected in (("cpu", RESNET50_CPU), ("gpu", RESNET50_GPU)):
            props = read_properties(out / "storage" / "resnet50" / "config" / kserve.CONFIG_FILES[device])
            entry = json.loads(props["model_snapshot"])["models"]["resnet50"]["0.1.0-r1"]
            assert {k: entry[k] for k in expected} == expected, (packaged_on, device)
        runtimes = yaml.safe_load_all((out / "manifests" / "servingruntimes.yaml").read_text())
        for runtime in (r for r in runtimes if r):
            args = runtime["spec"]["containers"][0]["args"]
            assert runtime["metadata"]["name"].endswith(args[args.index("--device") + 1])


def digits_per_gpu(tmp_path: Path) -> Path:
    """A store with digits archived for a GPU: on a CPU 1 worker and batches of 8, on a GPU 1 worker per GPU and
    batches of 4."""
    built_archive("digits")
    config = yaml.safe_load((ROOT / "config" / "models" / "digits.yaml").read_text())
    config.update(minWorkers=1, maxWorkers=1, gpu={"workers_per_gpu": 1, "batchSize": 4})
    config_file = tmp_path / "digits.yaml"
    config_file.write_text(yaml.safe_dump(config))
    store = tmp_path / "store"
    archive.build(archive.plan("digits", build_dir=BUILD, store=store, config_file=config_file, device="gpu"))
    return store


def fake_two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fake GPUs for tsforge's count, and ids 0,1 for TorchServe's (it counts CUDA_VISIBLE_DEVICES' entries
    without probing), which its workers get as gpu_id and, finding no CUDA, run on the CPU."""
    monkeypatch.setenv(gpus.FAKE_GPUS_ENV, "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")


def plan_read_back(management: str, log: Path) -> tuple[int, int, list[str], list[bool], str]:
    """(minWorkers, maxWorkers, the workers' status, whether TorchServe gave each a GPU, the GPUs it says it has)."""
    described = requests.get(f"{management}/models/digits", timeout=10).json()[0]
    said = re.search(r"Number of GPUs: (\d+)", log.read_text())
    return (described["minWorkers"], described["maxWorkers"], [w["status"] for w in described["workers"]],
            [w["gpu"] for w in described["workers"]], said[1] if said else "not said")


@pytest.mark.integration
def test_the_server_start_scales_to_workers_per_gpu_times_the_gpus(start_server: StartServer, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`make serve`'s start with 2 fake GPUs and 1 worker per GPU (the archive packages 1): 2 workers, all READY
    before the start returns, TorchServe told number_of_gpu=2 and saying so, each worker given a GPU id."""
    store = digits_per_gpu(tmp_path)
    fake_two_gpus(monkeypatch)
    server = start_server(["digits"], store=store)
    assert read_properties(server.run_dir / "config.properties")[gpus.GPU_COUNT_KEY] == "2"
    assert plan_read_back(server.url("management"), server.log_file) == (2, 2, ["READY"] * 2, [True] * 2, "2")
    server.stop()


@pytest.fixture()
def short_tmp() -> Iterator[Path]:
    """A pod root short enough for TorchServe's worker sockets (107 bytes) under any pytest or xdist temp path."""
    folder = Path(tempfile.mkdtemp(prefix="tsf-pod-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_the_pod_scales_to_workers_per_gpu_times_the_gpus_it_sees(tmp_path: Path, short_tmp: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  device: str) -> None:
    """The pod's command as each ServingRuntime runs it, on a bundle of that archive, with 2 fake GPUs: the GPU
    runtime's pod serves batches of 4 and 1 worker per GPU x 2 (its snapshot registered one) with TorchServe's 2
    GPUs; the CPU runtime's serves the CPU settings (1 worker, batches of 8) and hands TorchServe no GPU."""
    from tests import test_pod

    store = digits_per_gpu(tmp_path)
    bundle = tmp_path / "bundle"
    kserve.write_bundle(bundle, kserve.select_archives(store, ["digits"]), "pvc://m", "image", 2, {})
    fake_two_gpus(monkeypatch)
    command = next(c for c in test_pod.container_commands(bundle) if c[c.index("--device") + 1] == device)
    pod = test_pod.start_pod(bundle, short_tmp, command)
    try:
        server = pod.torchserve
        batch = requests.get(f"{server.url('management')}/models/digits", timeout=10).json()[0]["batchSize"]
        read_back = plan_read_back(server.url("management"), server.log_file)
    finally:
        assert test_pod.stop_pod(pod.process) == 0
    if device == "gpu":
        assert (read_back, batch) == ((2, 2, ["READY"] * 2, [True] * 2, "2"), 4)
    else:
        assert (read_back, batch) == ((1, 1, ["READY"], [False], "0"), 8)
