"""The standard Open Inference Protocol (KServe v2) in front of TorchServe, on KServe's own model server.

    python -m tsforge.front --inference-url http://127.0.0.1:8080 --model-store model_store --models digits \
        --http-port 8085 --grpc-port 8086 [--key-file RUN_DIR/key_file.json]

TorchServe 0.12 answers `POST /v2/models/M/infer` but not the rest of the protocol (health, server and model
metadata, model ready), and its gRPC service lives in its own proto package, so standard clients (tritonclient,
KServe's) cannot use it. This front is the `kserve` package's ModelServer, as KServe's TorchServe runtime runs
it: REST `/v2/...` and gRPC `inference.GRPCInferenceService`, one `kserve.Model` per archive that forwards
inference to TorchServe's REST v2 endpoint and describes its tensors from the `v2:` section of the archive's
model-config.yaml. Both ports listen on 127.0.0.1 only (KServe binds every interface); with `--key-file`
(TorchServe's token file) every call but liveness must carry TorchServe's inference key as a Bearer token,
on REST and gRPC, and the token goes on to TorchServe.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml
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
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

HOST = "127.0.0.1"
#: what a client may call without the token: liveness, as TorchServe's /ping
OPEN_PATHS = ("/", "/v2/health/live")


class InferenceKey:
    """TorchServe's inference key, re-read when its key file changes (keys expire and are renewed there)."""

    def __init__(self, key_file: Path) -> None:
        self.path = key_file
        self._stamp: float | None = None
        self._bearer = ""

    def bearer(self) -> str:
        stamp = self.path.stat().st_mtime
        if stamp != self._stamp:
            self._bearer = f"Bearer {json.loads(self.path.read_text())['inference']['key']}"
            self._stamp = stamp
        return self._bearer


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
    """The v2 JSON body TorchServe's handlers read. BYTES elements that arrived as raw bytes (gRPC) travel
    base64-encoded with a "model_name" key, the form TorchServe's own gRPC front uses (handlers/oip.py)."""
    inputs, raw_bytes = [], False
    for tensor in request.inputs:
        try:
            array = tensor.as_numpy()
        except (ValueError, TypeError) as exc:  # e.g. the data does not fill the shape
            described = f"input {tensor.name!r} (shape {list(tensor.shape)}, {tensor.datatype})"
            raise InvalidInput(f"{described}: {exc}") from None
        if tensor.datatype == "BYTES":
            items = list(array.ravel())
            raw_bytes = raw_bytes or any(isinstance(x, bytes) for x in items)
            data: list[Any] = [base64.b64encode(x).decode() if isinstance(x, bytes) else str(x) for x in items]
        else:
            data = array.ravel().tolist()
        inputs.append({"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype, "data": data})
    body: dict[str, Any] = {"inputs": inputs}
    if request.id:
        body["id"] = request.id
    if request.request_outputs:
        body["outputs"] = [{"name": output.name} for output in request.request_outputs]
    if raw_bytes:
        body["model_name"] = request.model_name
    return body


class TorchServeModel(Model):  # type: ignore[misc]
    """One archive served by TorchServe, as KServe's model server sees it."""

    def __init__(self, name: str, inference_url: str, tensors: dict[str, list[dict[str, Any]]],
                 client: httpx.AsyncClient) -> None:
        super().__init__(name)
        self.url = f"{inference_url}/v2/models/{name}/infer"
        self.tensors = tensors
        self.client = client
        self.ready = True  # the front starts once TorchServe reports the model's workers ready

    def get_input_types(self) -> list[dict[str, Any]]:
        return self.tensors["inputs"]

    def get_output_types(self) -> list[dict[str, Any]]:
        return self.tensors["outputs"]

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        forwarded = {"Content-Type": "application/json"}
        token = (headers or {}).get("authorization")
        if token:
            forwarded["Authorization"] = token
        answer = await self.client.post(self.url, content=json.dumps(torchserve_body(payload)), headers=forwarded)
        try:
            body = answer.json()
        except ValueError:
            body = {"error": answer.text}
        if answer.status_code != 200:
            message = _error_message(body) or f"TorchServe answered {answer.status_code}"
            if 400 <= answer.status_code < 500:
                raise InvalidInput(message)
            raise InferenceError(message, status=answer.status_code)
        answer_ = InferResponse.from_rest(body)
        # a gRPC client that sent raw contents reads raw contents back (tritonclient reads nothing else)
        return InferResponse(response_id=answer_.id, model_name=answer_.model_name, model_version=answer_.model_version,
                             infer_outputs=answer_.outputs, from_grpc=payload.from_grpc,
                             use_binary_outputs=payload.use_binary_outputs)


def _error_message(body: Any) -> str | None:
    """The handler's message from a v2 error answer ({"outputs": [{"name": "error", ...}]} or {"error": ...})."""
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            return str(body["error"])
        for output in body.get("outputs") or []:
            if output.get("name") == "error" and output.get("data"):
                return str(output["data"][0])
        if "message" in body:
            return str(body["message"])
    return None


class BearerToken(BaseHTTPMiddleware):
    """REST: 401 without `Authorization: Bearer KEY` (liveness excepted)."""

    def __init__(self, application: Any, key: InferenceKey) -> None:
        super().__init__(application)
        self.key = key

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path not in OPEN_PATHS and request.headers.get("authorization") != self.key.bearer():
            return JSONResponse({"error": "missing or wrong token: send Authorization: Bearer <inference key>"},
                                status_code=401)
        return await call_next(request)


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


class LoopbackGRPCServer(GRPCServer):  # type: ignore[misc]
    """KServe's gRPC server on 127.0.0.1 (it binds [::]), with the token check first when a key is set."""

    def __init__(self, *args: Any, key: InferenceKey | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key

    async def start(self, max_workers: int) -> None:
        interceptors = [*([TokenInterceptor(self.key)] if self.key else []), ExceptionToStatusInterceptor()]
        self._server = grpc.aio.server(interceptors=interceptors)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self._data_plane, self._model_repository_extension), self._server)
        self._server.add_insecure_port(f"{HOST}:{self._port}")
        await self._server.start()
        await self._server.wait_for_termination()


class LoopbackModelServer(ModelServer):  # type: ignore[misc]
    """KServe's ModelServer (one process) with both ports on 127.0.0.1 and the token rules of the profile."""

    def __init__(self, *, key: InferenceKey | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key = key

    def start(self, models: list[Model]) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        if self.key:
            app.add_middleware(BearerToken, key=self.key)
        self._rest_server = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                       self.http_port, grace_period=self.grace_period)
        self._rest_server.config.host = HOST
        self.servers.append(self._rest_server.start())
        self._grpc_server = LoopbackGRPCServer(self.grpc_port, self.dataplane, self.model_repository_extension,
                                               kwargs={}, grace_period=self.grace_period, key=self.key)
        self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.front", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inference-url", required=True, help="TorchServe's inference address")
    parser.add_argument("--model-store", type=Path, required=True)
    parser.add_argument("--models", required=True, help="comma-separated archive names in the store")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--key-file", type=Path, help="TorchServe's key_file.json: require its inference key")
    args = parser.parse_args(argv)
    key = InferenceKey(args.key_file) if args.key_file else None
    client = httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=httpx.Limits(max_connections=256))
    models = [TorchServeModel(name, args.inference_url, signature(args.model_store / f"{name}.mar"), client)
              for name in args.models.split(",") if name]
    LoopbackModelServer(key=key, http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=True,
                        workers=1).start(models)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
