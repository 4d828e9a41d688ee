"""The base of every tsforge handler: one hook per step, errors isolated per request.

A handler for a new model subclasses `BatchHandler` and writes `decode` (one request to one item),
optionally `collate`, `infer` and `encode` (one result row to JSON). The base does the rest:

- reads the archive's `model-config.yaml` `handler:` section into `self.config`,
- picks the device (`cuda:<gpu_id>` when there is a GPU), sets torch threads per worker,
- loads the TorchScript file (`torch.jit.load`, no pickle),
- answers each bad request with its own 4xx JSON and lets the rest of the batch through,
- reports decode/inference/encode times, batch size and errors as custom metrics.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from handlers.errors import InvalidInput, RequestError, internal_error_body
from handlers.payload import extract, parse_json_bytes
from handlers.telemetry import Telemetry

log = logging.getLogger(__name__)
JSON = "application/json"


class BatchHandler(BaseHandler):  # type: ignore[misc]
    """Subclass and implement `decode`; override `collate`, `infer` and `encode` as needed."""

    #: torch dtype the model runs in when `handler.precision` is not set
    default_precision = "fp32"

    def initialize(self, context: Any) -> None:
        self.context = context
        properties = context.system_properties
        self.model_dir = Path(properties.get("model_dir", "."))
        self.config: dict[str, Any] = dict((context.model_yaml_config or {}).get("handler") or {})
        self.device = self._pick_device(properties)
        self._set_threads(context)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            str(self.config.get("precision", self.default_precision))
        ]
        self.channels_last = bool(self.config.get("channels_last", False))
        self.telemetry = Telemetry(context)
        self.setup()
        self.initialized = True
        log.info("%s ready on %s (%s, threads=%d)", type(self).__name__, self.device, self.dtype,
                 torch.get_num_threads())

    # ---- hooks -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the model. The default loads the archive's TorchScript file."""
        self.model = self.load_torchscript()

    def decode(self, payload: Any) -> Any:
        """One request's payload to one model input item; raise a RequestError when it is bad."""
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        batch = torch.stack(items).to(self.device, non_blocking=True)
        if batch.is_floating_point():
            batch = batch.to(self.dtype)
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def infer(self, batch: Any) -> Any:
        return self.model(batch)

    def encode(self, row: Any) -> Any:
        """One result row to a JSON-serialisable value."""
        raise NotImplementedError

    # ---- the TorchServe entry point ----------------------------------------------------------
    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        self.context = context
        responses: list[bytes | None] = [None] * len(data)
        groups: list[tuple[int, int, bool]] = []  # (request index, item count, answer as a list)
        items: list[Any] = []
        started = time.perf_counter()
        for idx, row in enumerate(data):
            try:
                decoded, many = self._decode_request(row)
            except RequestError as exc:
                responses[idx] = self._reject(idx, exc)
                continue
            except Exception as exc:  # a decoder bug must not fail the batch: answer 500 for this row
                log.exception("decode failed for request %d", idx)
                responses[idx] = self._fail(idx, exc)
                continue
            groups.append((idx, len(decoded), many))
            items.extend(decoded)
        decoded_at = time.perf_counter()
        if items:
            try:
                rows = self._infer_rows(items)
            except Exception as exc:
                log.exception("inference failed for a batch of %d", len(items))
                for idx, _, _ in groups:
                    responses[idx] = self._fail(idx, exc)
                rows = None
            inferred_at = time.perf_counter()
            if rows is not None:
                self._answer(groups, rows, responses)
            self.telemetry.batch(len(items), decoded_at - started, inferred_at - decoded_at,
                                 time.perf_counter() - inferred_at)
        return [r if r is not None else b"{}" for r in responses]

    # ---- internals ---------------------------------------------------------------------------
    def _decode_request(self, row: dict[str, Any]) -> tuple[list[Any], bool]:
        payload = extract(row)
        if isinstance(payload, (bytes, bytearray)):
            payload = parse_json_bytes(payload)
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

    def _infer_rows(self, items: list[Any]) -> Sequence[Any]:
        with torch.inference_mode():
            output = self.infer(self.collate(items))
        if isinstance(output, torch.Tensor):
            output = output.float().cpu()
            return list(output.unbind(0))
        return list(output)

    def _answer(self, groups: list[tuple[int, int, bool]], rows: Sequence[Any], out: list[bytes | None]) -> None:
        cursor = 0
        for idx, count, many in groups:
            try:
                encoded = [self.encode(r) for r in rows[cursor : cursor + count]]
                body = {"predictions": encoded} if many else encoded[0]
                out[idx] = json.dumps(body).encode()
                self.context.set_response_content_type(idx, JSON)
            except Exception as exc:
                log.exception("encode failed for request %d", idx)
                out[idx] = self._fail(idx, exc)
            cursor += count

    def _reject(self, idx: int, exc: RequestError) -> bytes:
        self.context.set_response_status(exc.status, exc.phrase, idx)
        self.context.set_response_content_type(idx, JSON)
        self.telemetry.error(exc.kind)
        return json.dumps(exc.to_json()).encode()

    def _fail(self, idx: int, exc: BaseException) -> bytes:
        self.context.set_response_status(500, "Internal Server Error", idx)
        self.context.set_response_content_type(idx, JSON)
        self.telemetry.error("internal_error")
        return internal_error_body(exc)

    def _pick_device(self, properties: dict[str, Any]) -> torch.device:
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None and self.config.get("device", "auto") != "cpu":
            return torch.device(f"cuda:{gpu_id}")
        return torch.device("cpu")

    def _set_threads(self, context: Any) -> None:
        threads = self.config.get("threads")
        if threads is None:
            workers = int((context.model_yaml_config or {}).get("maxWorkers") or 1)
            threads = max(1, (os.cpu_count() or 1) // max(1, workers))
        torch.set_num_threads(int(threads))

    def load_torchscript(self) -> torch.jit.ScriptModule:
        manifest = self.context.manifest or {}
        serialized = (manifest.get("model") or {}).get("serializedFile")
        if not serialized:
            raise RuntimeError("the archive has no serialized TorchScript file")
        model: torch.jit.ScriptModule = torch.jit.load(  # type: ignore[no-untyped-call]
            str(self.model_dir / serialized), map_location=self.device
        )
        model.eval()
        if self.dtype != torch.float32:
            model = model.to(self.dtype)
        return model

    def read_json(self, name: str) -> Any:
        return json.loads((self.model_dir / name).read_text())
