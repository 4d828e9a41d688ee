"""The standard Open Inference Protocol (KServe v2) in front of TorchServe, on KServe's own model server.

    python -m tsforge.serving.front --inference-url http://127.0.0.1:8080 --model-store model_store --models digits \
        --http-port 8085 --grpc-port 8086 [--key-file RUN_DIR/key_file.json]

TorchServe 0.12 answers `POST /v2/models/M/infer` but not the rest of the protocol (health, server and model
metadata, model ready), and its gRPC service lives in its own proto package, so standard clients (tritonclient,
KServe's) cannot use it. This front is the `kserve` package's ModelServer, as KServe's TorchServe runtime runs
it: REST `/v2/...` and gRPC `inference.GRPCInferenceService`, one `kserve.Model` per archive that forwards
inference to TorchServe's REST v2 endpoint and describes its tensors from the `v2:` section of the archive's
model-config.yaml. A REST infer in JSON skips KServe's decoding and goes to TorchServe as it came
(tsforge/serving/front_rest.py), and so do v1 predict, `/predictions/M` and `/ping`. Form bodies of more than
`--max-form-fields` fields are refused before TorchServe's decoder sees them (tsforge/serving/front_guard.py). Both
ports listen on `--host`, 127.0.0.1 unless told otherwise (KServe's own servers bind every interface; `tsforge pod`
names 0.0.0.0, the pod's network, and keeps TorchServe on loopback). A request TorchServe refuses because the model's
job queue is full reads the same on every path: `{"error": ...}` with 503 over REST (JSON or the binary extension),
UNAVAILABLE over gRPC, with tsforge/serving/jobqueue.py's words instead of TorchServe's "has no worker". With
`--key-file` (TorchServe's token file) every call but liveness must carry
TorchServe's inference key as a Bearer token, on REST and gRPC, and the token goes on to TorchServe.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import yaml

from tsforge import extras

#: the subject of a missing `front` extra's message (tsforge/extras.py)
PURPOSE = "the v2 front (tsforge front)"

try:  # the `front` extra: without it, one line naming the extra (tsforge/extras.py), not a traceback
    import orjson
    from kserve import Model, ModelServer
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.errors import InferenceError, InvalidInput
    from kserve.model_server import app
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.infer_type import InferRequest, InferResponse
    from kserve.protocol.rest.server import RESTServer
    from starlette.responses import JSONResponse

    from tsforge.serving import jobqueue
    from tsforge.serving.front_guard import MAX_FORM_FIELDS, FormFieldLimit
    from tsforge.serving.front_rest import (
        MAX_REQUEST_SIZE,
        BearerToken,
        BodyLimit,
        InferenceKey,
        Passthrough,
        Upstream,
        error_message,
    )
except ImportError as exc:
    if (exc.name or "").partition(".")[0] in {"tsforge", "handlers", "export", "loadtest"}:
        raise  # a module of the project itself missing is a bug
    raise extras.missing(exc, "front", PURPOSE, "kserve") from None

HOST = "127.0.0.1"


def signature(mar: Path) -> dict[str, list[dict[str, Any]]]:
    """The `v2:` section (inputs and outputs: name, datatype, shape) of an archive's model-config.yaml."""
    with zipfile.ZipFile(mar) as archive:
        config = yaml.safe_load(archive.read("model-config.yaml")) or {}
    section = config.get("v2") or {}
    for key in ("inputs", "outputs"):
        tensors = section.get(key)
        if not tensors or not all({"name", "datatype", "shape"} <= set(t) for t in tensors):
            raise SystemExit(f"{mar.name}: model-config.yaml needs v2.{key}: a list of {{name, datatype, shape}} "
                             "for the front to describe the model")
    return {"inputs": list(section["inputs"]), "outputs": list(section["outputs"])}


def torchserve_body(request: InferRequest) -> dict[str, Any]:
    """The v2 JSON body TorchServe's handlers read. A BYTES input that arrived as raw bytes (gRPC) travels
    base64-encoded with `"parameters": {"content_type": "base64"}`, which the handlers decode (handlers/oip.py)."""
    inputs = []
    for tensor in request.inputs:
        try:
            array = tensor.as_numpy()
        except (ValueError, TypeError) as exc:  # e.g. the data does not fill the shape
            described = f"input {tensor.name!r} (shape {list(tensor.shape)}, {tensor.datatype})"
            raise InvalidInput(f"{described}: {exc}") from None
        if tensor.datatype == "BYTES":
            items = list(array.ravel())
            raw_bytes = any(isinstance(x, bytes) for x in items)
            data: list[Any] = [base64.b64encode(x if isinstance(x, bytes) else str(x).encode()).decode()
                               for x in items] if raw_bytes else [str(x) for x in items]
        else:
            raw_bytes, data = False, array.ravel().tolist()
        entry = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype, "data": data}
        if raw_bytes:
            entry["parameters"] = {"content_type": "base64"}
        inputs.append(entry)
    body: dict[str, Any] = {"inputs": inputs}
    if request.id:
        body["id"] = request.id
    if request.request_outputs:
        body["outputs"] = [{"name": output.name} for output in request.request_outputs]
    return body


class TorchServeError(InferenceError):  # type: ignore[misc]
    """TorchServe answered an inference with a server error (`status`): KServe's REST app answers it with that status
    and `{"error": message}`. (KServe's InferenceError takes its status as text and prefixes the message with it.)"""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.http_status = status


class QueueFull(TorchServeError):
    """TorchServe refused the request at once because the model's job queue is full: 503 over REST, UNAVAILABLE over
    gRPC, in jobqueue.py's words (TorchServe's own send the reader after workers)."""

    def __init__(self, model: str) -> None:
        super().__init__(jobqueue.queue_full_message(model, jobqueue.queue_size()), 503)


class TorchServeModel(Model):  # type: ignore[misc]
    """One archive served by TorchServe, as KServe's model server sees it."""

    def __init__(self, name: str, upstream: Upstream, tensors: dict[str, list[dict[str, Any]]]) -> None:
        super().__init__(name)
        self.upstream = upstream
        self.url = upstream.infer_url(name)
        self.tensors = tensors
        self.ready = True  # the front starts once TorchServe reports the model's workers ready

    def get_input_types(self) -> list[dict[str, Any]]:
        return self.tensors["inputs"]

    def get_output_types(self) -> list[dict[str, Any]]:
        return self.tensors["outputs"]

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        status, answer = await self.upstream.post(self.url, orjson.dumps(torchserve_body(payload)),
                                                  (headers or {}).get("authorization"))
        if status != 200:
            message = error_message(answer) or f"TorchServe answered {status}"
            if jobqueue.is_queue_full(status, message):
                raise QueueFull(self.name)
            if 400 <= status < 500:
                raise InvalidInput(message)
            raise TorchServeError(message, status)
        answer_ = InferResponse.from_rest(orjson.loads(answer))
        # a gRPC client that sent raw contents reads raw contents back (tritonclient reads nothing else)
        return InferResponse(response_id=answer_.id, model_name=answer_.model_name, model_version=answer_.model_version,
                             infer_outputs=answer_.outputs, from_grpc=payload.from_grpc,
                             use_binary_outputs=payload.use_binary_outputs)


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """gRPC: UNAUTHENTICATED without the `authorization: Bearer KEY` metadata (ServerLive excepted)."""

    def __init__(self, key: InferenceKey) -> None:
        self.key = key

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        metadata = dict(details.invocation_metadata or ())
        if details.method.endswith("/ServerLive") or metadata.get("authorization") == self.key.bearer():
            return await continuation(details)

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token: send metadata "
                                "authorization: Bearer <inference key>")

        return grpc.unary_unary_rpc_method_handler(refuse)


class FrontExceptionToStatus(ExceptionToStatusInterceptor):  # type: ignore[misc]
    """KServe's mapping of exceptions to gRPC status codes, but a full job queue is UNAVAILABLE (retry later), not
    INVALID_ARGUMENT, with the same words as over REST."""

    async def handle_exception(self, ex: Exception, request_or_iterator: Any, context: grpc.aio.ServicerContext,
                               method_name: str) -> None:
        if isinstance(ex, QueueFull):
            await context.abort(grpc.StatusCode.UNAVAILABLE, ex.reason)
        await super().handle_exception(ex, request_or_iterator, context, method_name)


class FrontGRPCServer(GRPCServer):  # type: ignore[misc]
    """KServe's gRPC server on `host` only, 127.0.0.1 unless the caller names another (KServe's binds [::]), with
    the token check first when a key is set."""

    def __init__(self, *args: Any, key: InferenceKey | None, host: str = HOST, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key
        self.host = host

    async def start(self, max_workers: int) -> None:
        interceptors = [*([TokenInterceptor(self.key)] if self.key else []), FrontExceptionToStatus()]
        self._server = grpc.aio.server(interceptors=interceptors)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self._data_plane, self._model_repository_extension), self._server)
        self._server.add_insecure_port(f"{self.host}:{self._port}")
        await self._server.start()
        await self._server.wait_for_termination()


class QuietRESTServer(RESTServer):  # type: ignore[misc]
    """KServe's REST server without its timing middleware, which only logs each request's timings (CPU time
    and a route lookup per request); TorchServe's own metrics and access log time every request already."""

    def _add_middlewares(self, app: Any) -> None:
        pass

    def _add_exception_handlers(self, app: Any) -> None:
        super()._add_exception_handlers(app)
        app.add_exception_handler(TorchServeError, torchserve_error)


async def torchserve_error(_: Any, exc: TorchServeError) -> JSONResponse:
    """TorchServe's status and message (a full queue: 503 and jobqueue.py's words) in KServe's `{"error"}` form."""
    return JSONResponse(status_code=exc.http_status, content={"error": exc.reason})


def _client_errors(decode: Callable[..., Any]) -> Callable[..., Any]:
    """KServe answers a REST body it cannot decode (e.g. BYTES that are not UTF-8) with a 500; it is the
    client's error, so a 400 naming the cause."""

    def decode_or_invalid(*args: Any, **kwargs: Any) -> Any:
        try:
            return decode(*args, **kwargs)
        except InferenceError as exc:
            raise InvalidInput(str(exc)[:500]) from None

    return decode_or_invalid


class FrontModelServer(ModelServer):  # type: ignore[misc]
    """KServe's ModelServer (one process) with both ports on `host` only, 127.0.0.1 unless the caller names another
    (`tsforge pod`: 0.0.0.0), and the token rules of the profile.

    REST goes through wrappers before KServe's app: the token check, the body's size, a form body's field count,
    then inference straight to TorchServe. Nothing is logged per request (TorchServe's access log has every request
    already).
    """

    def __init__(self, *, key: InferenceKey | None, upstream: Upstream, max_request_size: int = MAX_REQUEST_SIZE,
                 max_form_fields: int = MAX_FORM_FIELDS, host: str = HOST, **kwargs: Any) -> None:
        super().__init__(enable_latency_logging=False, **kwargs)
        self.key = key
        self.upstream = upstream
        self.max_request_size = max_request_size
        self.max_form_fields = max_form_fields
        self.host = host
        self.dataplane.decode = _client_errors(self.dataplane.decode)

    def start(self, models: list[Model]) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        passthrough = Passthrough(app, {model.name for model in models}, self.upstream)
        rest_app: Any = BodyLimit(FormFieldLimit(passthrough, self.max_form_fields), self.max_request_size)
        if self.key:
            rest_app = BearerToken(rest_app, self.key)
        self._rest_server = QuietRESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane,
                                            self.model_repository_extension, self.http_port,
                                            grace_period=self.grace_period)
        self._rest_server.config.app = rest_app  # KServe still builds its app (the global `app`) on start
        self._rest_server.config.host = self.host
        access = logging.getLogger("uvicorn.access")  # uvicorn logs a request only when this logger has a handler
        access.handlers, access.propagate = [], False
        self.servers.append(self._rest_server.start())
        self._grpc_server = FrontGRPCServer(self.grpc_port, self.dataplane, self.model_repository_extension,
                                            kwargs={}, grace_period=self.grace_period, key=self.key,
                                            host=self.host)
        self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.serving.front", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inference-url", required=True, help="TorchServe's inference address")
    parser.add_argument("--model-store", type=Path, required=True)
    parser.add_argument("--models", required=True, help="comma-separated archive names in the store")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--key-file", type=Path, help="TorchServe's key_file.json: require its inference key")
    parser.add_argument("--max-request-size", type=int, default=MAX_REQUEST_SIZE,
                        help="largest request body in bytes (TorchServe's max_request_size)")
    parser.add_argument("--max-form-fields", type=int, default=MAX_FORM_FIELDS,
                        help="most fields of a form body (urlencoded or multipart) passed on to TorchServe")
    parser.add_argument("--host", default=HOST, help="the only address both ports listen on (default: loopback)")
    parser.add_argument("--metrics-url", help="TorchServe's metrics address: GET /metrics answers its metrics")
    args = parser.parse_args(argv)
    key = InferenceKey(args.key_file) if args.key_file else None
    upstream = Upstream(args.inference_url, metrics_url=args.metrics_url)
    models = [TorchServeModel(name, upstream, signature(args.model_store / f"{name}.mar"))
              for name in args.models.split(",") if name]
    FrontModelServer(key=key, upstream=upstream, max_request_size=args.max_request_size,
                     max_form_fields=args.max_form_fields, host=args.host, http_port=args.http_port,
                     grpc_port=args.grpc_port, enable_grpc=True, workers=1).start(models)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
