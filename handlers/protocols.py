"""The wire formats a handler answers, one object each (after LitServe's `LitSpec`).

    Plain          any body `handlers.payload` reads        -> the handler's `encode` of its one row
    KServeV1       {"instances": [...]}                     -> {"predictions": [encode(row), ...]}
    OpenInference  {"inputs": [{"name", "shape", "datatype", "data"}]} (KServe v2, also through TorchServe's
                   gRPC bridge)                            -> {"model_name", "model_version", "id", "outputs"}

`pick` finds the first protocol that `matches` a payload; its `decode` calls the handler's per-item hooks and
returns a `Request` whose items join the batch; `encode` turns the request's result rows into its answer's
body; `error` turns an error body into an answer of this format. The handler's hooks stay per item (`decode`,
`encode`) or per v2 request (`decode_v2`, `encode_v2`), so a handler never sees the wire format it is not about.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import orjson

from handlers import oip
from handlers.errors import InvalidInput, RequestError
from handlers.payload import extract, parse_json_bytes


class Hooks(Protocol):
    """What a protocol uses of a handler (`handlers.base.BatchHandler` has it all)."""

    config: dict[str, Any]
    context: Any

    def decode(self, payload: Any) -> Any: ...

    def encode(self, row: Any) -> Any: ...

    def decode_v2(self, request: oip.InferRequest) -> list[Any]: ...

    def encode_v2(self, rows: Sequence[Any]) -> list[dict[str, Any]]: ...


@dataclass
class Request:
    """One decoded request: its protocol, its position in TorchServe's batch (-1: not from a batch, e.g. the
    archive's examples), its model input items, and what its answers need: the parsed v2 request (id, requested
    outputs); the raw payload when decoding failed."""

    protocol: WireProtocol
    index: int
    items: list[Any]
    parsed: Any = None


class WireProtocol:
    name: ClassVar[str]

    def matches(self, payload: Any) -> bool:
        raise NotImplementedError

    def decode(self, payload: Any, handler: Hooks, index: int = -1) -> Request:
        """The request's items; raises a RequestError naming what was wrong and what was expected."""
        raise NotImplementedError

    def encode(self, request: Request, rows: Sequence[Any], handler: Hooks) -> Any:
        """The answer's body (JSON-serialisable) for the request's result rows, one per item."""
        raise NotImplementedError

    def error(self, body: bytes, request: Request, context: Any) -> bytes:
        """The answer to `request` for an error body `{"code", "type", "message"}`."""
        return body


class Plain(WireProtocol):
    """One item per request, whatever the body: raw, base64, JSON envelopes, multipart (handlers/payload.py)."""

    name = "plain"

    def matches(self, payload: Any) -> bool:
        return True

    def decode(self, payload: Any, handler: Hooks, index: int = -1) -> Request:
        return Request(self, index, [handler.decode(payload)])

    def encode(self, request: Request, rows: Sequence[Any], handler: Hooks) -> Any:
        return handler.encode(rows[0])


class KServeV1(WireProtocol):
    """KServe v1: several items in one request, answered in their order; `handler.max_instances` bounds them."""

    name = "kserve-v1"

    def matches(self, payload: Any) -> bool:
        return isinstance(payload, dict) and "instances" in payload

    def decode(self, payload: Any, handler: Hooks, index: int = -1) -> Request:
        instances = payload["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidInput("\"instances\" must be a non-empty JSON array")
        limit = int(handler.config.get("max_instances", 64))
        if len(instances) > limit:
            raise InvalidInput(f"{len(instances)} instances in one request; the limit is {limit}")
        items = []
        for n, instance in enumerate(instances):
            try:
                items.append(handler.decode(instance))
            except RequestError as exc:
                raise type(exc)(f"instance {n}: {exc.message}") from None
        return Request(self, index, items)

    def encode(self, request: Request, rows: Sequence[Any], handler: Hooks) -> Any:
        return {"predictions": [handler.encode(row) for row in rows]}


class OpenInference(WireProtocol):
    """The Open Inference Protocol (KServe v2, handlers/oip.py); errors are v2 answers too, because TorchServe's
    gRPC bridge reads every answer to a v2 request as one (`oip.error_answer`)."""

    name = "v2"

    def matches(self, payload: Any) -> bool:
        return oip.is_infer_request(payload)

    def decode(self, payload: Any, handler: Hooks, index: int = -1) -> Request:
        parsed = oip.parse_request(payload, from_grpc_bridge(handler.context, index, payload))
        items = handler.decode_v2(parsed)
        if not items:  # e.g. shape [0, ...]: nothing to answer, and an empty batch has no output to stack
            raise InvalidInput(f"the request holds no items; {oip.SHAPE_HELP}, with a first dimension of at least 1")
        return Request(self, index, items, parsed)

    def encode(self, request: Request, rows: Sequence[Any], handler: Hooks) -> Any:
        return oip.response(request.parsed, handler.encode_v2(rows), handler.context, request.index)

    def error(self, body: bytes, request: Request, context: Any) -> bytes:
        return oip.error_answer(body, request.parsed, context, request.index)


#: the order matters: a v2 body is a JSON object too, and Plain takes whatever is left
DEFAULT: tuple[WireProtocol, ...] = (OpenInference(), KServeV1(), Plain())
PLAIN = DEFAULT[-1]


def pick(payload: Any, protocols: Sequence[WireProtocol] = DEFAULT) -> WireProtocol:
    return next((p for p in protocols if p.matches(payload)), PLAIN)


def payload_of(row: Mapping[str, Any]) -> Any:
    """The payload of one TorchServe request row, with JSON sent under a non-JSON content type parsed."""
    payload = extract(row)
    return parse_json_bytes(payload) if isinstance(payload, (bytes, bytearray)) else payload


def from_grpc_bridge(context: Any, index: int, payload: Any) -> bool:
    """Whether row `index` came from TorchServe's own v2 gRPC bridge: a "model_name" key and no HTTP headers
    (a REST body may carry "model_name" too: KServe's client sends it)."""
    if index < 0 or not isinstance(payload, dict) or "model_name" not in payload:
        return False
    processors = getattr(context, "request_processor", None) or []
    properties = processors[index].get_request_properties() if index < len(processors) else {}
    return not set(properties) - {"body"}


def v2_items(request: oip.InferRequest, handler: Hooks) -> list[Any]:
    """The default `decode_v2`: one input tensor whose slices along the first axis (or BYTES elements: base64
    or text) each go through the handler's `decode`."""
    tensor = request.only_input()
    items = []
    for n, item in enumerate(tensor.items()):
        try:
            items.append(handler.decode(item))
        except RequestError as exc:
            raise type(exc)(f"input {tensor.name!r} item {n}: {exc.message}") from None
    return items


def split(flat: Sequence[Any], requests: Sequence[Request]) -> Iterator[list[Any]]:
    """Each request's share of a batch-wide list (prepared items, result rows), in the requests' order."""
    cursor = 0
    for request in requests:
        count = len(request.items)
        yield list(flat[cursor : cursor + count])
        cursor += count


def dumps(body: Any) -> bytes:
    """An answer's JSON bytes through orjson, several times faster than json on float arrays (an embedding is
    hundreds of them): floats in their shortest form (1e-6, not 1e-06: the same value), non-ASCII text as UTF-8,
    NaN or infinity as null (json writes the non-standard NaN). What orjson refuses (integers over 64 bits,
    non-string keys) goes through json."""
    try:
        return orjson.dumps(body)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(body).encode()
