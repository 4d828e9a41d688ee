"""A full job queue reads the same on every client path of the v2 front, without TorchServe: a stub upstream on
127.0.0.1 answers every inference as TorchServe 0.12 does when the model's queue is full (503, "has no worker to
serve inference request"), and each path must give jobqueue.py's words instead:

- REST, v2 JSON (the passthrough, tsforge/serving/front_rest.py) and TorchServe's /predictions;
- REST, v2 binary tensor extension (KServe's decoding, then tsforge/serving/front.py's model);
- gRPC (KServe's servicer, behind the front's own gRPC server on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from tsforge.serving import jobqueue
from tsforge.serving.server import free_port

SIZE = 16  # the job queue the stub's TorchServe was given
MODEL = "digits"
TORCHSERVE_503 = {"code": 503, "type": "ServiceUnavailableException",
                  "message": f'Model "{MODEL}" has no worker to serve inference request. Please use scale workers API '
                             "to add workers. If this is a sequence inference, please check if it is closed, or "
                             "expired; or exceeds maximum sequence length"}
TENSORS = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
           "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]}
EXPECTED = jobqueue.queue_full_message(MODEL, SIZE)
#: a stub upstream and the front's own servers on 127.0.0.1
pytestmark = pytest.mark.integration
ALONE = "TSFORGE_TEST_ALONE"


def ran_alone(request: pytest.FixtureRequest) -> bool:
    """Runs this test in a Python of its own when tritonclient.grpc is loaded here (test_front and test_pod import
    it at collection): it registers the same `inference.*` protos as kserve, and a process cannot hold both."""
    if "tritonclient.grpc" not in sys.modules or os.environ.get(ALONE):
        return False
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                          cwd=request.config.rootpath, env={**os.environ, ALONE: "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    return True


@pytest.fixture(autouse=True)
def queue_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(jobqueue.SIZE_ENV, str(SIZE))  # as tsforge.serving.frontproc hands it to the front


@asynccontextmanager
async def full_torchserve() -> AsyncIterator[str]:
    """A stub of TorchServe's inference API whose queue is always full; its base URL."""

    async def refuse(_: web.Request) -> web.Response:
        return web.json_response(TORCHSERVE_503, status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def call_asgi(app: Callable[..., Awaitable[None]], path: str, body: bytes,
                    headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"content-length", str(len(body)).encode()), *headers], "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
    sent: list[dict[str, Any]] = []
    bodies = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return bodies.pop(0) if bodies else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_rest_json_and_predictions_name_the_full_queue() -> None:
    from tsforge.serving.front_rest import Passthrough, Upstream

    async def never(*_: Any) -> None:
        raise AssertionError("a JSON infer of a served model goes to TorchServe, not to KServe's app")

    async def run() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        async with full_torchserve() as url:
            passthrough = Passthrough(never, {MODEL}, Upstream(url))
            body = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]})
            v2 = await call_asgi(passthrough, f"/v2/models/{MODEL}/infer", body.encode(),
                                 [(b"content-type", b"application/json")])
            v1 = await call_asgi(passthrough, f"/predictions/{MODEL}", b"\x89PNG", [(b"content-type", b"image/png")])
            await passthrough.upstream._session.close()  # type: ignore[union-attr]
            return v2, v1

    (status, body), (status_v1, body_v1) = asyncio.run(run())
    assert (status, json.loads(body)) == (503, {"error": EXPECTED})
    assert status_v1 == 503 and json.loads(body_v1)["message"] == EXPECTED


def front_server(url: str) -> Any:
    from tsforge.serving import front
    from tsforge.serving.front_rest import Upstream

    upstream = Upstream(url)
    server = front.FrontModelServer(key=None, upstream=upstream, http_port=0, grpc_port=0, enable_grpc=True,
                                    workers=1)
    server.registered_models.update(front.TorchServeModel(MODEL, upstream, TENSORS))
    return server


def test_rest_binary_extension_names_the_full_queue(request: pytest.FixtureRequest) -> None:
    if ran_alone(request):
        return
    import httpx
    from fastapi import FastAPI
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING

    from tsforge.serving import front

    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 8}}]}).encode()

    async def run() -> httpx.Response:
        async with full_torchserve() as url:
            server = front_server(url)
            rest = front.QuietRESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension,
                                         0)
            app = FastAPI()  # KServe's routes and the front's error handlers, on an app of this test's own
            rest._register_endpoints(app)
            rest._add_exception_handlers(app)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front") as client:
                answer = await client.post(f"/v2/models/{MODEL}/infer", content=header + struct.pack("<2f", 1, 2),
                                           headers={"Inference-Header-Content-Length": str(len(header)),
                                                    "Content-Type": "application/octet-stream"})
            await server.registered_models.get_model(MODEL).upstream._session.close()
            return answer

    answer = asyncio.run(run())
    assert (answer.status_code, answer.json()) == (503, {"error": EXPECTED}), answer.text


def test_grpc_names_the_full_queue_as_unavailable(request: pytest.FixtureRequest) -> None:
    if ran_alone(request):
        return
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

    from tsforge.serving import front

    request = pb.ModelInferRequest(model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 2], contents=pb.InferTensorContents(fp32_contents=[1.0, 2.0]))])

    async def run() -> grpc.aio.AioRpcError:
        async with full_torchserve() as url:
            server = front_server(url)
            port = free_port()
            grpc_server = front.FrontGRPCServer(port, server.dataplane, server.model_repository_extension, kwargs={},
                                                grace_period=1, key=None, host="127.0.0.1")
            serving = asyncio.create_task(grpc_server.start(1))
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    await asyncio.wait_for(channel.channel_ready(), 30)
                    stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await stub.ModelInfer(request, timeout=30)
            finally:
                await grpc_server._server.stop(0)
                serving.cancel()
                await server.registered_models.get_model(MODEL).upstream._session.close()
            return caught.value

    error = asyncio.run(run())
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, EXPECTED)
