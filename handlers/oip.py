"""Open Inference Protocol (KServe v2) requests and answers, inside the handler.

TorchServe 0.12 routes `POST /v2/models/<model>/infer` to the model exactly like `/predictions/<model>`:
the JSON body reaches the handler unchanged and whatever the handler returns is the response body. So
the handler, not the frontend, must recognise a v2 request and answer in v2 form:

    request   {"id"?, "inputs": [{"name", "shape", "datatype", "data", "parameters"?}], "outputs"?: [{"name"}]}
    response  {"model_name", "model_version", "id", "outputs": [{"name", "shape", "datatype", "data"}]}

`data` may be flat (row-major, as the protocol says) or nested; its element count must match `shape`.
BYTES elements are strings: base64 for binary payloads such as images, plain text for text models. An input
with `"parameters": {"content_type": "base64"}` (MLServer's name for it) holds base64 of raw bytes, which are
decoded here; the v2 front (tsforge/serving/front.py) sends raw gRPC bytes that way.
By default the first axis of an input is the batch: each slice along it is one item for the handler's
`decode`, and each output carries the same leading batch dimension.

With `ts_open_inference_protocol=true`, TorchServe's gRPC `ModelInfer` turns each request into the same
JSON body plus a "model_name" key, with no HTTP headers, and sends each BYTES element base64-encoded, so such
elements are decoded back to their raw bytes here (`bridged`). A REST body may carry "model_name" too (KServe's
client sends it), so the key alone does not say the body came over gRPC. Its answer is parsed
from the handler's body whatever the status, so errors to v2 requests are v2 answers too (`error_answer`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from handlers.errors import InvalidInput
from handlers.payload import decode_base64

BYTES = "BYTES"
DATATYPES: dict[str, np.dtype[Any]] = {name: np.dtype(kind) for name, kind in (
    ("BOOL", "bool"), ("UINT8", "uint8"), ("UINT16", "uint16"), ("UINT32", "uint32"), ("UINT64", "uint64"),
    ("INT8", "int8"), ("INT16", "int16"), ("INT32", "int32"), ("INT64", "int64"),
    ("FP16", "float16"), ("FP32", "float32"), ("FP64", "float64"),
)}
DATATYPE_OF: dict[np.dtype[Any], str] = {dtype: name for name, dtype in DATATYPES.items()}
MAX_RANK = 16
SHAPE_HELP = 'each input is {"name": str, "shape": [int, ...], "datatype": "FP32"|"INT64"|"BYTES"|..., "data": [...]}'


@dataclass(frozen=True)
class InputTensor:
    name: str
    shape: tuple[int, ...]
    datatype: str
    #: numeric: an array of `shape`; BYTES: the elements as a flat list (str from REST, raw bytes from gRPC)
    data: np.ndarray[Any, Any] | list[str] | list[bytes]

    def items(self) -> list[Any]:
        """One item per slice along the first axis: JSON-like values a handler's `decode` reads."""
        if isinstance(self.data, list):
            if len(self.shape) > 1:
                raise InvalidInput(f"input {self.name!r}: a BYTES input holds one element per item; expected shape "
                                   f"[N], got {list(self.shape)}")
            return list(self.data)
        if not self.shape:
            raise InvalidInput(f"input {self.name!r} is a scalar; expected a leading batch dimension")
        return [row.tolist() for row in self.data]


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    requested_outputs: list[str] | None

    def only_input(self) -> InputTensor:
        if len(self.inputs) != 1:
            names = ", ".join(repr(t.name) for t in self.inputs)
            raise InvalidInput(f"this model takes one input tensor; the request has {len(self.inputs)} ({names})")
        return self.inputs[0]


def is_infer_request(payload: Any) -> bool:
    """A v2 body: "inputs" is a list of objects, or empty (the v1-style {"inputs": [1, 2]} is not)."""
    if not isinstance(payload, Mapping):
        return False
    inputs = payload.get("inputs")
    return isinstance(inputs, list) and all(isinstance(i, Mapping) for i in inputs)


def parse_request(payload: Mapping[str, Any], bridged: bool = False) -> InferRequest:
    """`bridged`: the body came from TorchServe's gRPC bridge, whose BYTES elements are all base64."""
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f'"id" must be a string; got {type(request_id).__name__}')
    if not payload["inputs"]:
        raise InvalidInput(f'"inputs" is empty; {SHAPE_HELP}')
    inputs = [_parse_input(n, spec, bridged) for n, spec in enumerate(payload["inputs"])]
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise InvalidInput(f"input names must be unique; got {names}")
    outputs = payload.get("outputs")
    requested = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, Mapping) and isinstance(o.get("name"), str)
                                                    for o in outputs):
            raise InvalidInput('"outputs" must be a list of {"name": str} objects')
        requested = [str(o["name"]) for o in outputs]
    return InferRequest(id=request_id or None, inputs=inputs, requested_outputs=requested)


def _parse_input(position: int, spec: Mapping[str, Any], bridged: bool = False) -> InputTensor:
    name = spec.get("name")
    where = f"input {name!r}" if isinstance(name, str) else f"input {position}"
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in spec]
    if missing:
        raise InvalidInput(f"{where} lacks {', '.join(missing)}; {SHAPE_HELP}")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{where}: \"name\" must be a non-empty string")
    shape = spec["shape"]
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InvalidInput(f"{where}: \"shape\" must be a list of at most {MAX_RANK} non-negative integers; "
                           f"got {shape!r}")
    datatype = spec["datatype"]
    if datatype != BYTES and datatype not in DATATYPES:
        raise InvalidInput(f"{where}: unknown datatype {datatype!r}; expected one of "
                           f"{', '.join([*DATATYPES, BYTES])}")
    data = spec["data"]
    if not isinstance(data, list):
        raise InvalidInput(f"{where}: \"data\" must be a JSON array")
    count = math.prod(shape)
    if datatype == BYTES:
        elements = _bytes_elements(where, data, count)
        parameters = spec.get("parameters")
        base64 = bridged or (isinstance(parameters, Mapping) and parameters.get("content_type") == "base64")
        raw = [decode_base64(e) if e else b"" for e in elements] if base64 else elements
        return InputTensor(name, tuple(shape), datatype, raw)
    return InputTensor(name, tuple(shape), datatype, _numeric(where, data, shape, DATATYPES[datatype]))


def _bytes_elements(where: str, data: list[Any], count: int) -> list[str]:
    elements = np.asarray(data, dtype=object).ravel().tolist() if data else []
    if not all(isinstance(e, str) for e in elements):
        raise InvalidInput(f"{where}: BYTES data must be strings (base64 for binary content)")
    if len(elements) != count:
        raise InvalidInput(f"{where}: shape says {count} elements, data holds {len(elements)}")
    return elements


def _numeric(where: str, data: list[Any], shape: list[int], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    try:
        raw = np.asarray(data)
    except ValueError:
        raise InvalidInput(f"{where}: \"data\" is ragged; expected a flat (row-major) list of numbers") from None
    if raw.size and raw.dtype.kind not in "biuf":
        raise InvalidInput(f"{where}: \"data\" must hold numbers for datatype {DATATYPE_OF[dtype]}")
    if raw.size != math.prod(shape):
        raise InvalidInput(f"{where}: shape {shape} means {math.prod(shape)} elements; data holds {raw.size}")
    if dtype.kind in "iub" and raw.dtype.kind == "f":
        raise InvalidInput(f"{where}: datatype {DATATYPE_OF[dtype]} but data holds fractional numbers")
    try:
        values = raw.astype(dtype, casting="unsafe") if dtype.kind == "f" else np.asarray(data, dtype=dtype)
    except (OverflowError, ValueError, TypeError):
        raise InvalidInput(f"{where}: data does not fit datatype {DATATYPE_OF[dtype]}") from None
    if dtype.kind == "f" and not np.isfinite(values).all():
        raise InvalidInput(f"{where}: data holds NaN, infinite or out-of-range values for {DATATYPE_OF[dtype]}")
    return values.reshape(shape)


def output_tensor(name: str, values: np.ndarray[Any, Any] | Sequence[str]) -> dict[str, Any]:
    """One entry of a response's "outputs": strings become BYTES, arrays their own datatype."""
    if not isinstance(values, np.ndarray):
        strings = list(values)
        return {"name": name, "shape": [len(strings)], "datatype": BYTES, "data": strings}
    datatype = DATATYPE_OF.get(values.dtype)
    if datatype is None:
        raise TypeError(f"output {name!r} has dtype {values.dtype}, which the protocol has no datatype for")
    return {"name": name, "shape": list(values.shape), "datatype": datatype, "data": values.ravel().tolist()}


def tensor_outputs(rows: Sequence[Any], name: str, labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The default answer: the model's output rows stacked to [N, ...]; for a classifier (one score per
    label) also "label", the top label of each row, as BYTES [N]."""
    values = np.stack([np.asarray(row) for row in rows])
    outputs = [output_tensor(name, values)]
    if labels is not None and values.ndim == 2 and values.shape[1] == len(labels):
        outputs.append(output_tensor("label", [labels[int(i)] for i in values.argmax(axis=1)]))
    return outputs


def response(request: InferRequest, outputs: list[dict[str, Any]], context: Any, idx: int) -> dict[str, Any]:
    """The v2 response body for request `idx` of TorchServe's `context`; only the requested outputs when the
    request named some. Without a client "id" the answer carries TorchServe's request id."""
    if request.requested_outputs is not None:
        available = {o["name"]: o for o in outputs}
        unknown = [n for n in request.requested_outputs if n not in available]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; this model returns {sorted(available)}")
        outputs = [available[n] for n in request.requested_outputs]
    return {**_identity(request.id, context, idx), "outputs": outputs}


def _identity(request_id: str | None, context: Any, idx: int) -> dict[str, str]:
    model = (context.manifest or {}).get("model") or {}
    return {
        "model_name": str(model.get("modelName") or context.model_name),
        "model_version": str(model.get("modelVersion") or ""),
        "id": request_id or context.get_request_id(idx) or "",
    }


def error_answer(body: bytes, request: Any, context: Any, idx: int) -> bytes:
    """An error body, made a valid v2 response as well when `request` (a payload or an InferRequest) is v2.

    Needed because TorchServe 0.12's gRPC ModelInfer ignores the status the handler sets and reads
    id, model_name, model_version and outputs from every answer: a plain error body throws in the
    frontend's worker thread, which then restarts the worker and drops the rest of its batch. The error
    also travels as a BYTES output named "error", the only way it reaches a gRPC client; over HTTP the
    4xx/5xx status says it failed and "error" (the protocol's error field) says why.
    """
    if isinstance(request, InferRequest):
        request_id = request.id
    elif is_infer_request(request):
        given = request.get("id")
        request_id = given if isinstance(given, str) else None
    else:
        return body
    error = json.loads(body)
    answer = {**error, "error": error.get("message", ""), **_identity(request_id, context, idx),
              "outputs": [output_tensor("error", [json.dumps(error)])]}
    return json.dumps(answer).encode()

