"""The base of every tsforge handler: one hook per step, errors isolated per request.

A handler for a new model subclasses `BatchHandler` and writes `decode` (one request to one item),
optionally `collate`, `infer` and `encode` (one result row to JSON). The base does the rest:

- reads the archive's `model-config.yaml` `handler:` section into `self.config`,
- picks the device (`cuda:<gpu_id>` when there is a GPU), sets torch threads per worker,
- loads the variant of the exported model that serves fastest here among those that keep the model's
  accuracy bound on this machine (`handlers.loading`: backend, precision and fusion named in the config or
  measured at start, then checked on the archive's held-out inputs against fp32; no pickle anywhere),
- answers each bad request with its own 4xx JSON and lets the rest of the batch through,
- reports decode/inference/encode times, batch size and errors as custom metrics.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from handlers import autoselect, oip, provenance
from handlers.errors import InvalidInput, RequestError, internal_error_body
from handlers.loading import VariantLoading
from handlers.payload import extract, parse_json_bytes
from handlers.telemetry import Telemetry

log = logging.getLogger(__name__)
JSON = "application/json"
# How a request is answered: False -> its one encoded item; True -> {"predictions": [...]} (KServe v1
# "instances"); an InferRequest -> an Open Inference Protocol (KServe v2) response.
Reply = bool | oip.InferRequest
#: response header that names the archive version which answered (HTTP only: gRPC has no headers here)
VERSION_HEADER = "X-Model-Version"


def default_threads(workers: int) -> int:
    """Torch threads per worker when the config names none: the cores, less one for TorchServe's frontend,
    shared among the workers. Measured on 2 cores: 2 threads in the one worker cut throughput 2-10x
    against 1, because the worker's threads fight the frontend's."""
    return max(1, ((os.cpu_count() or 1) - 1) // max(1, workers))


def probability_discrepancy(reference: torch.Tensor, output: torch.Tensor) -> float:
    """For classifiers: the largest change of any class probability, which is what a client sees."""
    change = torch.softmax(output.float(), dim=-1) - torch.softmax(reference.float(), dim=-1)
    return float(change.abs().max())


class ArchiveIntegrityError(RuntimeError):
    """The unpacked archive differs from its version file: tampered, or files of two versions mixed."""


class BatchHandler(VariantLoading, BaseHandler):  # type: ignore[misc]
    """Subclass and implement `decode`; override `collate`, `infer` and `encode` as needed."""

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
        self.device = self._pick_device(properties)
        self._set_threads(context)
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

    def collate(self, items: list[Any]) -> Any:
        """Stack the items on the worker's device; the runner casts to its precision and memory format."""
        return torch.stack(items).to(self.device, non_blocking=True)

    def prepare_batch(self, items: list[Any]) -> list[Any]:
        """Batch-level work between every request's `decode` and `collate` (e.g. decoding all of a batch's
        images in one GPU call): one entry per item, either the item `collate` gets or the RequestError that
        answers the item's request (the others are answered normally). The default changes nothing."""
        return items

    def infer(self, batch: Any) -> Any:
        return self.model(batch)

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
        tensor = request.only_input()
        decoded = []
        for n, item in enumerate(tensor.items()):
            try:
                decoded.append(self.decode(item))
            except RequestError as exc:
                raise type(exc)(f"input {tensor.name!r} item {n}: {exc.message}") from None
        return decoded

    def encode_v2(self, rows: Sequence[Any]) -> list[dict[str, Any]]:
        """The v2 "outputs" for a request's result rows: by default the stacked model output, named by
        `handler.v2_output` (default "output"), plus "label" when the handler has one label per score."""
        return oip.tensor_outputs(rows, str(self.config.get("v2_output", "output")), getattr(self, "labels", None))

    # ---- the TorchServe entry point ----------------------------------------------------------
    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        self.context = context
        if context.get_request_header(0, "describe") == "True":  # GET /models/NAME?customized=true
            return [json.dumps(self.describe()).encode()]
        responses: list[bytes | None] = [None] * len(data)
        groups: list[tuple[int, int, Reply]] = []  # (request index, item count, answer form)
        items: list[Any] = []
        started = time.perf_counter()
        for idx, row in enumerate(data):
            payload: Any = None
            try:
                payload = self._payload(row)
                decoded, reply = self._decode_request(payload, self._bridged(idx, payload))
            except RequestError as exc:
                responses[idx] = self._reject(idx, exc, payload)
                continue
            except Exception as exc:  # a decoder bug must not fail the batch: answer 500 for this row
                log.exception("decode failed for request %d", idx)
                responses[idx] = self._fail(idx, exc, payload)
                continue
            groups.append((idx, len(decoded), reply))
            items.extend(decoded)
        if items:
            groups, items = self._prepare(groups, items, responses)
        decoded_at = time.perf_counter()
        if items:
            try:
                rows = self._infer_rows(items)
            except Exception as exc:
                log.exception("inference failed for a batch of %d", len(items))
                self._fail_all(groups, exc, responses)
                rows = None
            inferred_at = time.perf_counter()
            if rows is not None:
                self._answer(groups, rows, responses)
            self.telemetry.batch(len(items), decoded_at - started, inferred_at - decoded_at,
                                 time.perf_counter() - inferred_at)
        for idx in range(len(data)):
            context.set_response_header(idx, VERSION_HEADER, self.version)
        return [r if r is not None else b"{}" for r in responses]

    # ---- internals ---------------------------------------------------------------------------
    @staticmethod
    def _payload(row: dict[str, Any]) -> Any:
        payload = extract(row)
        return parse_json_bytes(payload) if isinstance(payload, (bytes, bytearray)) else payload

    def _bridged(self, idx: int, payload: Any) -> bool:
        """Whether the row came from TorchServe's own v2 gRPC bridge: a "model_name" key and no HTTP headers."""
        if not isinstance(payload, dict) or "model_name" not in payload:
            return False
        processors = getattr(self.context, "request_processor", None) or []
        properties = processors[idx].get_request_properties() if idx < len(processors) else {}
        return not set(properties) - {"body"}

    def decode_request(self, payload: Any) -> list[Any]:
        """The model input items of one request as a client sends it (any wire format)."""
        return self._decode_request(payload)[0]

    def _decode_request(self, payload: Any, bridged: bool = False) -> tuple[list[Any], Reply]:
        if oip.is_infer_request(payload):
            request = oip.parse_request(payload, bridged)
            return self.decode_v2(request), request
        if isinstance(payload, dict) and "instances" in payload:
            instances = payload["instances"]
            if not isinstance(instances, list) or not instances:
                raise InvalidInput("\"instances\" must be a non-empty JSON array")
            limit = int(self.config.get("max_instances", 64))
            if len(instances) > limit:
                raise InvalidInput(f"{len(instances)} instances in one request; the limit is {limit}")
            decoded = []
            for n, instance in enumerate(instances):
                try:
                    decoded.append(self.decode(instance))
                except RequestError as exc:
                    raise type(exc)(f"instance {n}: {exc.message}") from None
            return decoded, True
        return [self.decode(payload)], False

    def _prepare(self, groups: list[tuple[int, int, Reply]], items: list[Any],
                 responses: list[bytes | None]) -> tuple[list[tuple[int, int, Reply]], list[Any]]:
        """Run `prepare_batch`; a request with an item that failed there gets that item's 4xx, the rest go on."""
        try:
            prepared = self.prepare_batch(items)
        except Exception as exc:
            log.exception("batch decoding failed for a batch of %d", len(items))
            self._fail_all(groups, exc, responses)
            return [], []
        kept_groups: list[tuple[int, int, Reply]] = []
        kept_items: list[Any] = []
        cursor = 0
        for idx, count, reply in groups:
            chunk = prepared[cursor : cursor + count]
            cursor += count
            failed = next(((n, e) for n, e in enumerate(chunk) if isinstance(e, RequestError)), None)
            if failed is None:
                kept_groups.append((idx, count, reply))
                kept_items.extend(chunk)
                continue
            n, error = failed
            if count > 1:
                error = type(error)(f"item {n}: {error.message}")
            responses[idx] = self._reject(idx, error, reply)
        return kept_groups, kept_items

    def _infer_rows(self, items: list[Any]) -> Sequence[Any]:
        with torch.inference_mode():
            output = self.infer(self.collate(items))
        if isinstance(output, torch.Tensor):
            output = output.float().cpu()
            return list(output.unbind(0))
        return list(output)

    def _answer(self, groups: list[tuple[int, int, Reply]], rows: Sequence[Any], out: list[bytes | None]) -> None:
        cursor = 0
        for idx, count, reply in groups:
            chunk = rows[cursor : cursor + count]
            try:
                if isinstance(reply, oip.InferRequest):
                    body = oip.response(reply, self.encode_v2(chunk), self.context, idx)
                else:
                    encoded = [self.encode(r) for r in chunk]
                    body = {"predictions": encoded} if reply else encoded[0]
                out[idx] = json.dumps(body).encode()
                self.context.set_response_content_type(idx, JSON)
            except RequestError as exc:
                out[idx] = self._reject(idx, exc, reply)
            except Exception as exc:
                log.exception("encode failed for request %d", idx)
                out[idx] = self._fail(idx, exc, reply)
            cursor += count

    def _reject(self, idx: int, exc: RequestError, request: Any = None) -> bytes:
        """The 4xx answer; `request` (the payload or its reply form) makes it a v2 answer for v2 requests."""
        self.context.set_response_status(exc.status, exc.phrase, idx)
        self.context.set_response_content_type(idx, JSON)
        self.telemetry.error(exc.kind)
        return oip.error_answer(json.dumps(exc.to_json()).encode(), request, self.context, idx)

    def _fail_all(self, groups: list[tuple[int, int, Reply]], exc: BaseException,
                  responses: list[bytes | None]) -> None:
        for idx, _, reply in groups:
            responses[idx] = self._fail(idx, exc, reply)

    def _fail(self, idx: int, exc: BaseException, request: Any = None) -> bytes:
        self.context.set_response_status(500, "Internal Server Error", idx)
        self.context.set_response_content_type(idx, JSON)
        self.telemetry.error("internal_error")
        return oip.error_answer(internal_error_body(exc), request, self.context, idx)

    def _pick_device(self, properties: dict[str, Any]) -> torch.device:
        """The device; on CUDA the `handler:` keys of model-config.yaml's `gpu:` section apply (logged)."""
        gpu_id = properties.get("gpu_id")
        if not (torch.cuda.is_available() and gpu_id is not None and self.config.get("device", "auto") != "cpu"):
            return torch.device("cpu")
        device = torch.device(f"cuda:{gpu_id}")
        overrides = device_overrides(getattr(self.context, "model_yaml_config", None), device)
        if overrides:
            self.config.update(overrides)
            log.info("device %s: gpu section of model-config.yaml applied: %s", device, overrides)
        return device

    def _set_threads(self, context: Any) -> None:
        threads = self.config.get("threads")
        if threads is None:
            threads = default_threads(int((context.model_yaml_config or {}).get("maxWorkers") or 1))
        torch.set_num_threads(int(threads))

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

    def sample_inputs(self) -> tuple[torch.Tensor, ...] | None:
        """A full batch built from the archive's `examples.json` requests, as `infer` receives it."""
        examples = self.model_dir / "examples.json"
        if not examples.is_file():
            return None
        items: list[Any] = []
        for case in json.loads(examples.read_text()):
            items.extend(self.decode_request(case["input"]))
        if not items:
            return None
        batch = self.collate((items * self.batch_size)[: self.batch_size])
        return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)

    def read_json(self, name: str) -> Any:
        return json.loads((self.model_dir / name).read_text())

    def read_labels(self, name: str = "index_to_name.json") -> list[str]:
        """Class names in index order from the archive's `{"0": name, ...}` file."""
        labels = self.read_json(name)
        return [str(labels[str(i)]) for i in range(len(labels))]


def device_overrides(model_config: Mapping[str, Any] | None, device: torch.device) -> dict[str, Any]:
    """The `handler:` keys of model-config.yaml's `gpu:` section, which apply when a worker's device is CUDA."""
    if device.type != "cuda":
        return {}
    section = (model_config or {}).get("gpu") or {}
    return dict(section.get("handler") or {}) if isinstance(section, Mapping) else {}
