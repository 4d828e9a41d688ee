"""Custom handler metrics through TorchServe's `context.metrics`.

Every name here is declared in config/metrics.yaml (model_metrics), which is how TorchServe's
Prometheus endpoint learns of them. Every value is labelled ModelName, ModelVersion (the archive's version)
and Level, in that order: TorchServe's frontend gives the values of a metric line the names declared there.

The timing gauges are emitted per batch, as TorchServe's own are, unless `handler.metrics_interval_s`
is set: then they are means over windows of that length. Each emitted value is a log line the worker
writes and the frontend parses; at a few thousand small batches a second those lines cost the worker a
sixth of its CPU, and a gauge scraped every few seconds shows one value of them anyway.
"""

from __future__ import annotations

import time
from typing import Any

from ts.metrics.metric_type_enum import MetricTypes

DIMENSIONS = ["ModelName", "ModelVersion", "Level"]
GAUGES = {
    "HandlerDecodeTime": "ms",
    "HandlerInferenceTime": "ms",
    "HandlerEncodeTime": "ms",
    "HandlerBatchSize": "count",
}
ERRORS = "HandlerRequestErrors"
#: the served variant's held-out measure against fp32 on this machine, and 1 while it serves below its bound
ACCURACY = {"HandlerHeldOutAccuracy": "ratio", "HandlerAccuracyBelowBound": "count"}


class Telemetry:
    """Per-batch timings as window means, per-type error counts as they happen; silent without metrics.

    With `interval_s` > 0 the first batch is reported at once and later ones are folded into means,
    reported by the first batch that ends `interval_s` or more after the last report.
    """

    def __init__(self, context: Any, interval_s: float = 0.0, *, version: str | None = None) -> None:
        if interval_s < 0:
            raise ValueError(f"the metrics interval must be >= 0 seconds, got {interval_s}")
        self.metrics = getattr(context, "metrics", None)
        self.model = getattr(context, "model_name", None) or "unknown"
        self.version = version or manifest_version(context)
        self._labels = [self.model, self.version, "Model"]
        self.interval_s = interval_s
        self._gauges: dict[str, Any] = {}
        self._errors: Any = None
        self._sums = dict.fromkeys(GAUGES, 0.0)
        self._batches = 0
        self._due = 0.0
        if self.metrics is None:
            return
        for name, unit in GAUGES.items():
            self._gauges[name] = self.metrics.add_metric_to_cache(name, unit, list(DIMENSIONS), MetricTypes.GAUGE)
        self._errors = self.metrics.add_metric_to_cache(
            ERRORS, "count", [*DIMENSIONS, "ErrorType"], MetricTypes.COUNTER
        )
        for name, unit in ACCURACY.items():
            self._gauges[name] = self.metrics.add_metric_to_cache(name, unit, list(DIMENSIONS), MetricTypes.GAUGE)

    def batch(self, size: int, decode_s: float, infer_s: float, encode_s: float) -> None:
        if not self._gauges:
            return
        sums = self._sums
        sums["HandlerDecodeTime"] += decode_s * 1000.0
        sums["HandlerInferenceTime"] += infer_s * 1000.0
        sums["HandlerEncodeTime"] += encode_s * 1000.0
        sums["HandlerBatchSize"] += size
        self._batches += 1
        now = time.monotonic()
        if now < self._due:
            return
        for name, total in sums.items():  # the timing gauges only
            self._gauges[name].add_or_update(round(total / self._batches, 3), self._labels)
        self._sums = dict.fromkeys(GAUGES, 0.0)
        self._batches = 0
        self._due = now + self.interval_s

    def accuracy(self, verdict: dict[str, Any] | None) -> None:
        """The served variant's held-out verdict (`handlers.accuracy.Verdict.to_json()`), once at worker start;
        fp32 TorchScript, the reference, has none and counts as 1.0 within its bound."""
        if not self._gauges:
            return
        within = verdict is None or bool(verdict.get("within_bound"))
        self._gauges["HandlerHeldOutAccuracy"].add_or_update(1.0 if verdict is None else float(verdict["value"]),
                                                            self._labels)
        self._gauges["HandlerAccuracyBelowBound"].add_or_update(0 if within else 1, self._labels)

    def error(self, kind: str) -> None:
        if self._errors is not None:
            self._errors.add_or_update(1, [*self._labels, kind])


def manifest_version(context: Any) -> str:
    """The version the archive was built with (MANIFEST.json), for a caller that names none."""
    manifest = getattr(context, "manifest", None) or {}
    return str((manifest.get("model") or {}).get("modelVersion") or "unknown")
