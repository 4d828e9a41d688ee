"""The v2 front's REST side in front of KServe's app: the token rule, and inference passed straight to TorchServe.

TorchServe already answers `POST /v2/models/M/infer` in the protocol's JSON form. Parsing that body into KServe's
types and back (pydantic, numpy, base64, JSON again) cost the front CPU time on every request, which a small model's
throughput pays for (docs/benchmarks.md, the front's cost; docs/data/front-cost.json). So a JSON infer for a served
model goes to TorchServe as it came, and the answer comes back as TorchServe gave it; errors are rewritten to
KServe's `{"error": message}` form. Everything else (health, metadata, ready, and infer in the binary tensor
extension, which TorchServe cannot read) goes on to KServe's app. Both wrappers are plain ASGI: Starlette's
BaseHTTPMiddleware costs a task per request.

What a client of a KServe pod sends besides v2 goes to TorchServe as it came too, TorchServe's answer unchanged:
KServe v1 `POST /v1/models/M:predict` and TorchServe's `POST /predictions/M[/VERSION]` (any body: raw images,
JSON, forms; the handlers answer every format and their own 4xx), `GET /ping`, and, when the front is given
TorchServe's metrics address (`tsforge pod`), `GET /metrics`. KServe's app keeps the rest of v1: `GET /v1/models`
and `GET /v1/models/M` (ready).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tsforge.serving import jobqueue

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: what a client may call without the token: liveness, as TorchServe's /ping
OPEN_PATHS = ("/", "/v2/health/live")
INFER_PATH = re.compile(r"^/v2/models/([^/]+)/infer$")
V1_PREDICT_PATH = re.compile(r"^/v1/models/([^/:]+):predict$")
PREDICTIONS_PATH = re.compile(r"^/predictions/([^/]+)(?:/[^/]+)?$")
#: the request headers that go on to TorchServe (what its handlers and token check read); hop-by-hop and the
#: client's other headers stay at the front
FORWARDED_HEADERS = (b"content-type", b"authorization", b"accept")
#: the binary tensor extension's header: such bodies are not JSON, KServe's app decodes them
BINARY_HEADER = b"inference-header-content-length"
#: TorchServe's default max_request_size (bytes)
MAX_REQUEST_SIZE = 6_553_500
#: how long a refused body (too large, too many form fields) waits for its 413. Refusing is cheap, but the rest of
#: a 6 MB body still crosses the socket (CPU time of the front's one core), and a client that sends such bodies
#: back to back would take as much of the front as it likes; meanwhile the front reads nothing more from that
#: connection (uvicorn pauses reading past 64 KiB), so waiting costs no CPU and holds each such connection to one
#: refused body a second
REFUSAL_DELAY_S = 1.0


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


class Upstream:
    """TorchServe's inference API, one keep-alive connection pool (made in the serving event loop)."""

    def __init__(self, inference_url: str, timeout_s: float = 300.0, metrics_url: str | None = None) -> None:
        self.base = inference_url.rstrip("/")
        self.metrics_url = metrics_url.rstrip("/") + "/metrics" if metrics_url else None
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def infer_url(self, model: str) -> str:
        return f"{self.base}/v2/models/{model}/infer"

    async def post(self, url: str, body: bytes, authorization: str | None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if authorization:
            headers["Authorization"] = authorization
        status, _, answer = await self.request("POST", url, body, headers)
        return status, answer

    async def request(self, method: str, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
        """(status, content type, body) of TorchServe's answer."""
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256),
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        async with self._session.request(method, url, data=body or None, headers=headers) as answer:
            return answer.status, answer.headers.get("Content-Type", "application/json"), await answer.read()


def error_message(body: bytes) -> str | None:
    """The handler's message in a TorchServe error answer ({"outputs": [{"name": "error"}]}, {"error"}, {"message"})."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace").strip() or None
    if isinstance(parsed, dict):
        if isinstance(parsed.get("error"), str):
            return str(parsed["error"])
        for output in parsed.get("outputs") or []:
            if isinstance(output, dict) and output.get("name") == "error" and output.get("data"):
                return str(output["data"][0])
        if "message" in parsed:
            return str(parsed["message"])
    return None


async def respond(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BearerToken:
    """401 without `Authorization: Bearer KEY` on every REST call but liveness."""

    def __init__(self, app: ASGIApp, key: InferenceKey) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            sent = dict(scope["headers"]).get(b"authorization", b"").decode(errors="replace")
            if sent != self.key.bearer():
                message = {"error": "missing or wrong token: send Authorization: Bearer <inference key>"}
                await respond(send, 401, orjson.dumps(message))
                return
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over `limit` bytes, as TorchServe's max_request_size: at once when Content-Length says so,
    else as soon as the streamed body passes it (the error is JSON either way). Neither KServe's app nor the
    passthrough has a limit of its own."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, f"request body of {int(declared)} bytes")
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if started:
                raise
            await self._refuse(send, f"request body of more than {self.limit} bytes")

    async def _refuse(self, send: Send, what: str) -> None:
        await asyncio.sleep(REFUSAL_DELAY_S)
        message = f"{what}; the limit is {self.limit} (max_request_size)"
        await respond(send, 413, orjson.dumps({"error": message}))


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body; None when the client went away."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(body)


class Passthrough:
    """Inference on a served model goes to TorchServe untouched (v2 JSON infer, v1 predict, /predictions), and so
    do /ping and /metrics; everything else to `app` (KServe's)."""

    def __init__(self, app: ASGIApp, models: set[str], upstream: Upstream) -> None:
        self.app = app
        self.models = models
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._route(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        url, v2 = route
        body = await read_body(receive)
        if body is None:
            return
        if not url:  # /predictions/M of a model not served here: KServe's app has no such route
            served = ", ".join(sorted(self.models))
            message = f"no model {scope['path'].split('/')[2]!r} is served here; served: {served}"
            await respond(send, 404, orjson.dumps({"code": 404, "type": "ModelNotFoundException", "message": message}))
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
                   if name in FORWARDED_HEADERS}
        if v2:
            headers["content-type"] = "application/json"
        try:
            status, content_type, answer = await self.upstream.request(scope["method"], url, body, headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            await respond(send, 502, orjson.dumps({"error": f"TorchServe did not answer: {exc!r}"}))
            return
        if v2 and status != 200:  # KServe's error form, TorchServe's status (400 bad input, 413 too large, 503 busy)
            answer = orjson.dumps({"error": error_message(answer) or f"TorchServe answered {status}"})
            content_type = "application/json"
        # only a 503 is parsed: every answer passes here, and reading a 200's body would cost each inference
        if status == 503 and jobqueue.is_queue_full(status, error_message(answer)):  # the words: jobqueue.py
            answer, content_type = jobqueue.queue_full_body(scope["path"], v2), "application/json"
        await respond(send, status, answer, content_type.encode("latin-1"))

    def _route(self, scope: Scope) -> tuple[str, bool] | None:
        """(TorchServe's URL, whether it is v2 infer) for what goes to TorchServe; ("", False) for /predictions
        of an unknown model; None for what KServe's app answers."""
        if scope["type"] != "http":
            return None
        method, path = scope["method"], scope["path"]
        if method == "GET":
            if path == "/ping":
                return f"{self.upstream.base}/ping", False
            return (self.upstream.metrics_url, False) if path == "/metrics" and self.upstream.metrics_url else None
        if method != "POST":
            return None
        infer = INFER_PATH.match(path)
        if infer is not None:
            binary = any(name == BINARY_HEADER for name, _ in scope["headers"])
            return (self.upstream.infer_url(infer[1]), True) if infer[1] in self.models and not binary else None
        v1 = V1_PREDICT_PATH.match(path)
        predictions = PREDICTIONS_PATH.match(path)
        if (v1 is None or v1[1] not in self.models) and predictions is None:
            return None  # KServe's app: its 404 for a v1 model it does not know
        if predictions is not None and predictions[1] not in self.models:
            return "", False
        query = scope.get("query_string", b"")
        return self.upstream.base + path + (f"?{query.decode('latin-1')}" if query else ""), False
