"""Handler metrics through TorchServe's own metrics cache (config/metrics.yaml), read from its log lines, and
from a real TorchServe's Prometheus endpoint, labelled with the model's name and archive version."""

from __future__ import annotations

import json
import logging
import re
import time
import zipfile
from types import SimpleNamespace

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers.telemetry import Telemetry
from tests.conftest import STORE
from tsforge.project import ROOT
from tsforge.serving.server import TorchServe

MANIFEST = {"model": {"modelName": "m", "modelVersion": "1.5"}}


def telemetry(interval_s: float, **kwargs: str) -> Telemetry:
    context = SimpleNamespace(metrics=MetricsCacheYamlImpl(str(ROOT / "config" / "metrics.yaml")), model_name="m",
                              manifest=MANIFEST)
    return Telemetry(context, interval_s, **kwargs)


def emitted(caplog: pytest.LogCaptureFixture, name: str) -> list[float]:
    return [float(v) for v in re.findall(rf"\[METRICS\]{name}\.\w+:([0-9.]+)", caplog.text)]


def test_every_batch_is_reported_by_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    meter = telemetry(0.0)
    for size in (1, 4, 8):
        meter.batch(size, 0.002, 0.010, 0.001)
    assert emitted(caplog, "HandlerBatchSize") == [1.0, 4.0, 8.0]
    assert emitted(caplog, "HandlerInferenceTime") == [10.0, 10.0, 10.0]


def test_with_an_interval_batches_are_folded_into_window_means(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    meter = telemetry(0.5)
    meter.batch(2, 0.001, 0.004, 0.001)  # the first batch is reported at once
    for size in (4, 6, 8):
        meter.batch(size, 0.001, 0.002 * size, 0.001)
    assert emitted(caplog, "HandlerBatchSize") == [2.0]
    time.sleep(0.55)
    meter.batch(2, 0.001, 0.004, 0.001)  # the window is over: the mean of the four batches since
    assert emitted(caplog, "HandlerBatchSize") == [2.0, 5.0]
    assert emitted(caplog, "HandlerInferenceTime") == [4.0, 10.0]


def test_errors_are_counted_at_once_whatever_the_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    meter = telemetry(60.0)
    meter.error("invalid_input")
    meter.error("invalid_input")
    assert len(re.findall(r"HandlerRequestErrors\.Count:1\|#ModelName:m,ModelVersion:1\.5,Level:Model,"
                          r"ErrorType:invalid_input", caplog.text)) == 2


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="metrics interval must be >= 0"):
        telemetry(-1.0)


def test_the_version_label_is_the_one_given_else_the_manifest_s(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    telemetry(0.0, version="2.0-r3").batch(1, 0.001, 0.001, 0.001)
    telemetry(0.0).batch(2, 0.001, 0.001, 0.001)
    assert re.search(r"HandlerBatchSize\.Count:1\.0\|#ModelName:m,ModelVersion:2\.0-r3,Level:Model", caplog.text)
    assert re.search(r"HandlerBatchSize\.Count:2\.0\|#ModelName:m,ModelVersion:1\.5,Level:Model", caplog.text)


def handler_samples(server: TorchServe) -> dict[str, list[dict[str, str]]]:
    text = requests.get(server.url("metrics") + "/metrics", timeout=10).text
    return {family.name: [dict(s.labels) for s in family.samples if "_created" not in s.name]
            for family in text_string_to_metric_families(text) if family.name.startswith("Handler")}


@pytest.mark.integration
def test_prometheus_labels_handler_metrics_with_the_archive_version(digits_server: TorchServe) -> None:
    archive = zipfile.ZipFile(STORE / "digits.mar")
    version = json.loads(archive.read("version.json"))["version"]
    example = json.loads(archive.read("examples.json"))[0]
    url = digits_server.url("inference") + "/predictions/digits"
    assert requests.post(url, json=example["input"], timeout=30).status_code == 200
    assert requests.post(url, json={"data": "not//base64!!"}, timeout=30).status_code == 400
    wanted = ("HandlerBatchSize", "HandlerDecodeTime", "HandlerInferenceTime", "HandlerEncodeTime",
              "HandlerRequestErrors")
    deadline = time.monotonic() + 15  # handler metrics reach the frontend through the worker's log
    while not all(name in (families := handler_samples(digits_server)) for name in wanted):
        assert time.monotonic() < deadline, f"handler metrics missing: {sorted(families)}"
        time.sleep(0.3)
    for name in wanted:
        labels = [s for s in families[name] if s.get("ModelName") == "digits"]
        assert labels and all(s["ModelVersion"] == version and s["Level"] == "Model" for s in labels), families[name]
    assert {"ModelName": "digits", "ModelVersion": version, "ErrorType": "undecodable_input"}.items() <= \
        next(s for s in families["HandlerRequestErrors"] if s.get("ErrorType") == "undecodable_input").items()
