"""The base of every tsforge handler: one hook per step, errors isolated per request.

A handler for a new model subclasses `BatchHandler` and writes `decode` (one request's payload to one item)
and `encode` (one result row to JSON), optionally `prepare_batch`, `collate`, `infer` and `unbatch` (the
batch's output to one row per item). The base reads the `handler:` section of the archive's model-config.yaml
into `self.config`, picks the device and threads (`handlers.placement`), loads the fastest variant that keeps
the accuracy bound here (`handlers.loading`), speaks each wire format through its protocol object
(`handlers.protocols`), answers each bad request with its own 4xx and the rest normally, and reports times,
batch sizes and errors as metrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from handlers import autoselect, oip, protocols, provenance
from handlers.errors import RequestError, internal_error_body
from handlers.loading import VariantLoading
from handlers.placement import default_threads, device_overrides, pick_device, worker_threads
from handlers.telemetry import Telemetry

__all__ = ["VERSION_HEADER", "ArchiveIntegrityError", "BatchHandler", "default_threads", "device_overrides",
           "probability_discrepancy"]
log = logging.getLogger(__name__)
JSON = "application/json"
#: response header that names the archive version which answered (HTTP only: gRPC has no headers here)
VERSION_HEADER = "X-Model-Version"


def probability_discrepancy(reference: torch.Tensor, output: torch.Tensor) -> float:
    """For classifiers: the largest change of any class probability, which is what a client sees."""
    change = torch.softmax(output.float(), dim=-1) - torch.softmax(reference.float(), dim=-1)
    return float(change.abs().max())


class ArchiveIntegrityError(RuntimeError):
    """The unpacked archive differs from its version file: tampered, or files of two versions mixed."""


class BatchHandler(VariantLoading, BaseHandler):  # type: ignore[misc]
    """Subclass and implement `decode` and `encode`; override the other hooks as needed."""

    #: the wire formats answered, tried in order (`handlers.protocols.pick`)
    wire_protocols: tuple[protocols.WireProtocol, ...] = protocols.DEFAULT

    #: `handler.precision` / `handler.backend` when the config names none
    default_precision = autoselect.AUTO
    default_backend = autoselect.AUTO
    default_fusion = autoselect.AUTO
    #: the largest discrepancy from fp32 that `auto` accepts, in the units of `discrepancy`
    default_tolerance = 0.01

    def initialize(self, context: Any) -> None:
        self.context = context
        properties = context.system_properties
        self.model_dir = Path(properties.get("model_dir", "."))
        self.config: dict[str, Any] = dict((context.model_yaml_config or {}).get("handler") or {})
        self.device = pick_device(properties.get("gpu_id"), self.config, context.model_yaml_config)
        torch.set_num_threads(worker_threads(self.config, context.model_yaml_config))
        self.settings = autoselect.Settings.from_config(
            {"precision": self.default_precision, "backend": self.default_backend,
             "onednn_fusion": self.default_fusion, **self.config},
            tolerance=self.default_tolerance)
        self.channels_last = bool(self.config.get("channels_last", False))
        self.batch_size = int((context.model_yaml_config or {}).get("batchSize") or 1)
        self.version = self.check_archive()
        self.telemetry = Telemetry(context, float(self.config.get("metrics_interval_s", 0.0)), version=self.version)
        self.selection: dict[str, Any] = {}
        self.setup()
        self.initialized = True
        log.info("%s %s ready on %s (%s, threads=%d)", type(self).__name__, self.version, self.device,
                 self.selection.get("variant", "custom model"), torch.get_num_threads())

    # ---- hooks -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the model. The default loads the fastest variant of the archive's export (`load_model`)."""
        self.model = self.load_model()

    def decode(self, payload: Any) -> Any:
        """One request's payload to one model input item; raise a RequestError when it is bad."""
        raise NotImplementedError

    def prepare_batch(self, items: list[Any]) -> list[Any]:
        """Batch-level work between every request's `decode` and `collate` (e.g. decoding all of a batch's
        images in one GPU call): one entry per item, either the item `collate` gets or the RequestError that
        answers the item's request (the others are answered normally). The default changes nothing."""
        return items

    def collate(self, items: list[Any]) -> Any:
        """Stack the items on the worker's device; the runner casts to its precision and memory format."""
        return torch.stack(items).to(self.device, non_blocking=True)

    def infer(self, batch: Any) -> Any:
        return self.model(batch)

    def unbatch(self, output: Any, count: int) -> list[Any]:
        """`infer`'s output for a batch of `count` items, as one row per item for `encode`: by default a
        tensor's rows in float32 on the CPU, a list or tuple as it is. Override for structured outputs (a
        detector's dict per image, a segmenter's class maps) or cheaper rows (text_handler: numpy)."""
        if isinstance(output, torch.Tensor):
            return list(output.float().cpu().unbind(0))
        return list(output)

    def encode(self, row: Any) -> Any:
        """One result row to a JSON-serialisable value."""
        raise NotImplementedError

    def discrepancy(self, reference: torch.Tensor, output: torch.Tensor) -> float:
        """How far a variant's raw model output is from fp32's on the same batch, for `precision: auto`:
        by default the largest difference relative to the reference's largest magnitude."""
        scale = max(float(reference.abs().max()), 1e-6)
        return float((output.float() - reference.float()).abs().max()) / scale

    def decode_v2(self, request: oip.InferRequest) -> list[Any]:
        """A v2 request's items: by default one input tensor whose slices along the first axis (or BYTES
        elements: base64 or text) each go through `decode`."""
        return protocols.v2_items(request, self)

    def encode_v2(self, rows: Sequence[Any]) -> list[dict[str, Any]]:
        """The v2 "outputs" for a request's result rows: by default the stacked model output, named by
        `handler.v2_output` (default "output"), plus "label" when the handler has one label per score."""
        return oip.tensor_outputs(rows, str(self.config.get("v2_output", "output")), getattr(self, "labels", None))

    # ---- the TorchServe entry point ----------------------------------------------------------
    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        """Pick each request's protocol and decode it, then prepare_batch, collate, infer and unbatch the good
        items together, and encode each request's rows in its protocol. A bad request gets its own 4xx and a
        bug in one request's decoding or encoding its own 500; the other requests are answered."""
        self.context = context
        if context.get_request_header(0, "describe") == "True":  # GET /models/NAME?customized=true
            return [json.dumps(self.describe()).encode()]
        answers: list[bytes | None] = [None] * len(data)
        started = time.perf_counter()
        decoded = [self._decode_row(idx, row, answers) for idx, row in enumerate(data)]
        requests = self._prepare([r for r in decoded if r is not None], answers)
        items = [item for request in requests for item in request.items]
        decoded_at = time.perf_counter()
        if items:
            rows = self._run(items, requests, answers)
            inferred_at = time.perf_counter()
            if rows:
                for request, chunk in zip(requests, protocols.split(rows, requests), strict=True):
                    answers[request.index] = self._encode(request, chunk)
            self.telemetry.batch(len(items), decoded_at - started, inferred_at - decoded_at,
                                 time.perf_counter() - inferred_at)
        for idx in range(len(data)):
            context.set_response_header(idx, VERSION_HEADER, self.version)
        return [answer if answer is not None else b"{}" for answer in answers]

    def decode_request(self, payload: Any) -> list[Any]:
        """The model input items of one request as a client sends it (any wire format): examples, held-out inputs."""
        return protocols.pick(payload, self.wire_protocols).decode(payload, self).items

    # ---- internals ---------------------------------------------------------------------------
    def _decode_row(self, idx: int, row: dict[str, Any], answers: list[bytes | None]) -> protocols.Request | None:
        protocol, payload = protocols.PLAIN, None
        try:
            payload = protocols.payload_of(row)
            protocol = protocols.pick(payload, self.wire_protocols)
            return protocol.decode(payload, self, idx)
        except Exception as exc:  # a decoder bug must not fail the batch: a 500 for this request only
            if not isinstance(exc, RequestError):
                log.exception("decode failed for request %d", idx)
            answers[idx] = self._error(protocols.Request(protocol, idx, [], payload), exc)
            return None

    def _prepare(self, requests: list[protocols.Request], answers: list[bytes | None]) -> list[protocols.Request]:
        """Run `prepare_batch`; a request with an item that failed there gets that item's 4xx, the rest go on."""
        if not requests:
            return []
        try:
            prepared = self.prepare_batch([item for request in requests for item in request.items])
        except Exception as exc:
            log.exception("batch decoding failed for a batch of %d requests", len(requests))
            for request in requests:
                answers[request.index] = self._error(request, exc)
            return []
        kept = []
        for request, chunk in zip(requests, protocols.split(prepared, requests), strict=True):
            failed = next(((n, e) for n, e in enumerate(chunk) if isinstance(e, RequestError)), None)
            if failed is None:
                request.items = chunk
                kept.append(request)
                continue
            n, error = failed
            if len(chunk) > 1:
                error = type(error)(f"item {n}: {error.message}")
            answers[request.index] = self._error(request, error)
        return kept

    def _run(self, items: list[Any], requests: list[protocols.Request], answers: list[bytes | None]) -> list[Any]:
        """collate -> infer -> unbatch: one row per item, or none when that fails (a 500 to each request)."""
        try:
            with torch.inference_mode():
                output = self.infer(self.collate(items))
            rows = self.unbatch(output, len(items))
            if len(rows) != len(items):
                raise ValueError(f"unbatch returned {len(rows)} rows for a batch of {len(items)} items")
            return rows
        except Exception as exc:
            log.exception("inference failed for a batch of %d", len(items))
            for request in requests:
                answers[request.index] = self._error(request, exc)
            return []

    def _encode(self, request: protocols.Request, rows: list[Any]) -> bytes:
        try:
            body = protocols.dumps(request.protocol.encode(request, rows, self))
        except Exception as exc:  # an encoder bug (or a RequestError such as unknown v2 outputs): this request only
            if not isinstance(exc, RequestError):
                log.exception("encode failed for request %d", request.index)
            return self._error(request, exc)
        self.context.set_response_content_type(request.index, JSON)
        return body

    def _error(self, request: protocols.Request, exc: BaseException) -> bytes:
        """The answer to a failed request in its protocol: a RequestError's 4xx, anything else a 500."""
        if isinstance(exc, RequestError):
            status, phrase, kind, body = exc.status, exc.phrase, exc.kind, json.dumps(exc.to_json()).encode()
        else:
            status, phrase, kind, body = 500, "Internal Server Error", "internal_error", internal_error_body(exc)
        self.context.set_response_status(status, phrase, request.index)
        self.context.set_response_content_type(request.index, JSON)
        self.telemetry.error(kind)
        return request.protocol.error(body, request, self.context)

    def check_archive(self) -> str:
        """The archive's version; refuses to load (raises) when a file differs from `version.json`."""
        manifest_version = ((self.context.manifest or {}).get("model") or {}).get("modelVersion")
        found = provenance.problems(self.model_dir, manifest_version)
        if found:
            message = (f"refusing to load {getattr(self.context, 'model_name', '?')}: the archive does not match "
                       f"its {provenance.VERSION_FILE}: " + "; ".join(found))
            log.error(message)
            raise ArchiveIntegrityError(message)
        return str(provenance.read(self.model_dir)["version"])

    def describe(self) -> dict[str, Any]:
        """The management API's `customizedMetadata`: the version and how this worker runs the model."""
        return {"version": self.version, "device": str(self.device), "threads": torch.get_num_threads(),
                "selection": self.selection}

    def read_json(self, name: str) -> Any:
        return json.loads((self.model_dir / name).read_text())

    def read_labels(self, name: str = "index_to_name.json") -> list[str]:
        """Class names in index order from the archive's `{"0": name, ...}` file."""
        labels = self.read_json(name)
        return [str(labels[str(i)]) for i in range(len(labels))]

