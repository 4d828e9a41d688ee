"""Custom handler metrics through TorchServe's `context.metrics`.

Every name here is declared in config/metrics.yaml (model_metrics), which is how TorchServe's
Prometheus endpoint learns of them.
"""

from __future__ import annotations

from typing import Any

from ts.metrics.metric_type_enum import MetricTypes

DIMENSIONS = ["ModelName", "Level"]
GAUGES = {
    "HandlerDecodeTime": "ms",
    "HandlerInferenceTime": "ms",
    "HandlerEncodeTime": "ms",
    "HandlerBatchSize": "count",
}
ERRORS = "HandlerRequestErrors"


class Telemetry:
    """Emits per-batch timings and per-type error counts; silent when the context has no metrics."""

    def __init__(self, context: Any) -> None:
        self.metrics = getattr(context, "metrics", None)
        self.model = getattr(context, "model_name", None) or "unknown"
        self._gauges: dict[str, Any] = {}
        self._errors: Any = None
        if self.metrics is None:
            return
        for name, unit in GAUGES.items():
            self._gauges[name] = self.metrics.add_metric_to_cache(name, unit, list(DIMENSIONS), MetricTypes.GAUGE)
        self._errors = self.metrics.add_metric_to_cache(
            ERRORS, "count", [*DIMENSIONS, "ErrorType"], MetricTypes.COUNTER
        )

    def batch(self, size: int, decode_s: float, infer_s: float, encode_s: float) -> None:
        if not self._gauges:
            return
        values = {
            "HandlerDecodeTime": decode_s * 1000.0,
            "HandlerInferenceTime": infer_s * 1000.0,
            "HandlerEncodeTime": encode_s * 1000.0,
            "HandlerBatchSize": float(size),
        }
        for name, value in values.items():
            self._gauges[name].add_or_update(round(value, 3), [self.model, "Model"])

    def error(self, kind: str) -> None:
        if self._errors is not None:
            self._errors.add_or_update(1, [self.model, "Model", kind])
