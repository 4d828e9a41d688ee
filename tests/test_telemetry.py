"""Handler metrics through TorchServe's own metrics cache (config/metrics.yaml), read from its log lines."""

from __future__ import annotations

import logging
import re
import time
from types import SimpleNamespace

import pytest
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers.telemetry import Telemetry
from tsforge.project import ROOT


def telemetry(interval_s: float) -> Telemetry:
    context = SimpleNamespace(metrics=MetricsCacheYamlImpl(str(ROOT / "config" / "metrics.yaml")), model_name="m")
    return Telemetry(context, interval_s)


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
    assert len(re.findall(r"HandlerRequestErrors\.Count:1\|#ModelName:m,Level:Model,ErrorType:invalid_input",
                          caplog.text)) == 2


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="metrics interval must be >= 0"):
        telemetry(-1.0)
