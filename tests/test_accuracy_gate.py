"""The accuracy gate (handlers/accuracy.py) against a deliberately damaged int8 export: the digits CNN's ONNX
int8 file with the output rows of two classes swapped, which none of the archive's examples belong to. On
those examples it answers exactly as fp32, so only the held-out check can tell; on the held-out digits it
gives fp32's label about four times in five, below the declared 0.99.

`auto` must not serve it (shown twice: by a real worker start, and with made-up timings that make it the
fastest, so the refusal is exercised whatever this CPU's speeds); pinned, it must be refused with the figure;
pinned and accepted by the config, it serves with a warning and HandlerAccuracyBelowBound = 1."""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import requests
from onnx import numpy_helper

from export.models import digits
from handlers import autoselect
from handlers.accuracy import AccuracyRefused
from handlers.runtimes import Artefacts, Variant, load
from loadtest import matrix
from loadtest.serving import selection
from tests.conftest import BUILD, StartServer, built_archive, png_bytes
from tests.test_digits_handler import make_context
from tests.test_telemetry import handler_samples
from tsforge.serving.server import TorchServe

DAMAGED = Variant("onnxruntime", "int8")
LAST_LAYER = ("classifier.3.weight_quantized", "classifier.3.weight_scale", "classifier.3.weight_zero_point",
              "classifier.3.bias_quantized", "classifier.3.bias_quantized_scale",
              "classifier.3.bias_quantized_zero_point")


def swapped_classes() -> tuple[int, int]:
    """Two classes that none of the archive's example digits belong to."""
    _, _, _, y_test = digits.load_split()
    unused = sorted(set(range(10)) - {int(y) for y in y_test[:4]})
    return unused[0], unused[1]


def damage(onnx_file: Path, first: int, second: int) -> None:
    """Swap two output rows of the last layer's quantized weights, scales, zero points and bias."""
    model = onnx.load(str(onnx_file))
    found = 0
    for initializer in model.graph.initializer:
        if initializer.name in LAST_LAYER and len(initializer.dims) >= 1 and initializer.dims[0] == 10:
            array = numpy_helper.to_array(initializer).copy()
            array[[first, second]] = array[[second, first]]
            initializer.CopyFrom(numpy_helper.from_array(array, initializer.name))
            found += 1
    assert found >= 2, "the int8 ONNX export no longer has the per-class tensors this damage swaps"
    onnx.save(model, str(onnx_file))


@pytest.fixture(scope="module")
def damaged_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built_archive("digits")
    build = tmp_path_factory.mktemp("damaged_build")
    shutil.copytree(BUILD / "digits", build / "digits", ignore=shutil.ignore_patterns("stage*", "mar*"))
    damage(build / "digits" / "digits.int8.onnx", *swapped_classes())
    return build


@pytest.fixture(scope="module")
def store(damaged_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    mar = built_archive("digits")
    target = tmp_path_factory.mktemp("damaged_store")
    matrix.pinned_archive("digits", None, mar, damaged_build, target, model_name="damaged_auto")
    matrix.pinned_archive("digits", DAMAGED, mar, damaged_build, target, model_name="damaged_pinned")
    matrix.pinned_archive("digits", DAMAGED, mar, damaged_build, target, model_name="damaged_accepted",
                          accept_lower_accuracy=True)
    return target


def test_the_damage_is_invisible_on_the_examples_and_plain_on_the_held_out_digits(damaged_build: Path) -> None:
    artefacts = Artefacts.read(damaged_build / "digits", "digits.pt")
    fp32, damaged = (load(v, artefacts, torch_cpu()) for v in (Variant(), DAMAGED))
    _, _, x_test, _ = digits.load_split()
    examples, held_out = digits.to_tensor(x_test[:4]), digits.to_tensor(x_test)
    assert (fp32(examples).argmax(1) == damaged(examples).argmax(1)).all()
    agreement = float((fp32(held_out).argmax(1) == damaged(held_out).argmax(1)).float().mean())
    assert 0.6 < agreement < digits.MIN_TOP1_AGREEMENT


def torch_cpu():
    import torch

    return torch.device("cpu")


def unpacked_handler(mar: Path, target: Path, monkeypatch: pytest.MonkeyPatch):
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(target)
    monkeypatch.syspath_prepend(str(target))
    from digits_handler import DigitsHandler

    handler = DigitsHandler()
    handler.initialize(make_context(target, 1))
    return handler


def test_auto_refuses_the_damaged_variant_even_when_it_is_the_fastest(store: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSFORGE_CACHE_DIR", str(tmp_path / "cache"))
    handler = unpacked_handler(store / "damaged_auto.mar", tmp_path / "auto", monkeypatch)
    assert handler.selection["variant"] != DAMAGED.name  # a real worker start on this machine
    tried = {t["variant"]: t for t in handler.selection["trials"]}
    # without a native int8 path (ATen capped at `default`) it is not even a candidate here
    damaged = tried.get(DAMAGED.name) or {"accuracy": None}
    if damaged["accuracy"] is not None:  # it was preferred here, then refused on its figure
        assert damaged["accuracy"]["within_bound"] is False

    # Whatever this CPU's timings: made-up ones that put the damaged variant first, real runners and check.
    artefacts = Artefacts.read(tmp_path / "auto", "digits.pt")
    runners = {v: load(v, artefacts, torch_cpu()) for v in (Variant(), Variant("onnxruntime"), DAMAGED)}
    trials = [autoselect.Trial(v, seconds, 0.0, runner=runners[v])
              for v, seconds in ((Variant(), 3.0), (Variant("onnxruntime"), 2.0), (DAMAGED, 1.0))]
    choice = autoselect.choose(trials, handler.settings, handler.accuracy_check(runners[Variant()]), 8)
    assert choice.variant == Variant("onnxruntime")
    refused = trials[2].accuracy
    assert refused is not None and not refused.within and refused.inputs == 360 and refused.value < 0.99


def test_a_pinned_damaged_variant_is_refused_in_process(store: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSFORGE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(AccuracyRefused, match=r"refusing to serve onnxruntime-int8: top1_agreement 0\.\d+ < 0\.99 "
                                              r"on 360 held-out inputs"):
        unpacked_handler(store / "damaged_pinned.mar", tmp_path / "pinned", monkeypatch)


@pytest.fixture(scope="module")
def server(start_server: StartServer, store: Path) -> TorchServe:
    return start_server(["damaged_auto", "damaged_accepted"], store=store)


@pytest.mark.integration
def test_served_auto_answers_the_held_out_digits_as_fp32(server: TorchServe) -> None:
    chosen = selection(server, "damaged_auto")
    assert chosen["variant"] != DAMAGED.name and chosen["below_bound"] is False
    _, _, x_test, _ = digits.load_split()
    url = f"{server.url('inference')}/predictions/damaged_auto"
    served = np.array([int(requests.post(url, data=png_bytes(x), timeout=30).json()["label"]) for x in x_test[:100]])
    fp32 = np.asarray(load(Variant(), Artefacts.read(BUILD / "digits", "digits.pt"), torch_cpu())(
        digits.to_tensor(x_test[:100])).argmax(1))
    assert (served == fp32).mean() >= digits.MIN_TOP1_AGREEMENT


@pytest.mark.integration
def test_a_served_pinned_damaged_variant_is_refused_with_its_figure(server: TorchServe) -> None:
    register = requests.post(server.url("management") + "/models", timeout=120,
                             params={"url": "damaged_pinned.mar", "synchronous": "true"})
    assert register.status_code >= 400
    model_log = server.run_dir / "logs" / "model_log.log"
    deadline = time.monotonic() + 15
    while "refusing to serve onnxruntime-int8" not in model_log.read_text():
        assert time.monotonic() < deadline, "no refusal in the model log"
        time.sleep(0.2)  # the log appender is asynchronous
    line = next(x for x in model_log.read_text().splitlines() if "refusing to serve onnxruntime-int8" in x)
    assert "top1_agreement 0." in line and "< 0.99 on 360 held-out inputs" in line
    requests.delete(server.url("management") + "/models/damaged_pinned", timeout=30)


@pytest.mark.integration
def test_accepted_below_the_bound_serves_with_a_warning_and_a_metric(server: TorchServe) -> None:
    chosen = selection(server, "damaged_accepted")
    assert chosen["variant"] == DAMAGED.name and chosen["below_bound"] is True
    assert chosen["accuracy"]["value"] < digits.MIN_TOP1_AGREEMENT
    example = json.loads(zipfile.ZipFile(server.model_store / "damaged_accepted.mar").read("examples.json"))[0]
    answer = requests.post(f"{server.url('inference')}/predictions/damaged_accepted", json=example["input"],
                           timeout=30)
    assert answer.status_code == 200
    deadline = time.monotonic() + 15
    while True:
        samples = handler_samples(server)
        below = [s for s in samples.get("HandlerAccuracyBelowBound", []) if s.get("ModelName") == "damaged_accepted"]
        if below:
            break
        assert time.monotonic() < deadline, f"no HandlerAccuracyBelowBound for damaged_accepted: {sorted(samples)}"
        time.sleep(0.3)
    text = requests.get(server.url("metrics") + "/metrics", timeout=10).text
    assert any(line.startswith("HandlerAccuracyBelowBound{") and 'ModelName="damaged_accepted"' in line
               and line.rstrip().endswith(" 1.0") for line in text.splitlines()), text
    assert "BELOW its accuracy bound" in (server.run_dir / "logs" / "model_log.log").read_text()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_worker_start_measures_once_and_the_others_reuse_it(tmp_path: Path) -> None:
    """`loadtest.startup` on digits: its two configured workers start (one measures), one more is added (it
    reuses); the JSON records both times and the machine. Bounds are loose here: the figures are the docs'."""
    from loadtest import startup

    built_archive("digits")
    out = tmp_path / "startup.json"
    assert startup.main(["--models", "digits", "--out", str(out), "--first-s", "300", "--others-s", "300"]) == 0
    result = json.loads(out.read_text())
    row = result["models"][0]
    assert row["workers"] == 2 and row["workers_measuring"] == 1 and row["workers_reusing"] == 2, row
    assert row["added_worker_s"] > 0 and row["first_worker_s"] > 0 and row["within_bounds"] is True
    assert row["variant"] in row["candidates"] and result["machine"]["cpu"]
