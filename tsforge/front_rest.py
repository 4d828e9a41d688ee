"""The v2 front's REST side in front of KServe's app: the token rule, and infer passed straight to TorchServe.

TorchServe already answers `POST /v2/models/M/infer` in the protocol's JSON form. Parsing that body into KServe's
types and back (pydantic, numpy, base64, JSON again) cost the front about 4.5 ms of CPU a request, a third of
ResNet-18's throughput on two cores. So a JSON infer for a served model goes to TorchServe as it came, and the
answer comes back as TorchServe gave it; errors are rewritten to KServe's `{"error": message}` form. Everything
else (health, metadata, ready, and infer in the binary tensor extension, which TorchServe cannot read) goes on to
KServe's app. Both wrappers are plain ASGI: Starlette's BaseHTTPMiddleware costs a task per request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: what a client may call without the token: liveness, as TorchServe's /ping
OPEN_PATHS = ("/", "/v2/health/live")
INFER_PATH = re.compile(r"^/v2/models/([^/]+)/infer$")
#: the binary tensor extension's header: such bodies are not JSON, KServe's app decodes them
BINARY_HEADER = b"inference-header-content-length"
#: TorchServe's default max_request_size (bytes)
MAX_REQUEST_SIZE = 6_553_500


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

    def __init__(self, inference_url: str, timeout_s: float = 300.0) -> None:
        self.base = inference_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def infer_url(self, model: str) -> str:
        return f"{self.base}/v2/models/{model}/infer"

    async def post(self, url: str, body: bytes, authorization: str | None) -> tuple[int, bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256),
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        headers = {"Content-Type": "application/json"}
        if authorization:
            headers["Authorization"] = authorization
        async with self._session.post(url, data=body, headers=headers) as answer:
            return answer.status, await answer.read()


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


async def respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
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


class BodyLimit:
    """413 for a body over `limit` bytes, as TorchServe's max_request_size: at once (JSON) when Content-Length
    says so, else while it streams in (Starlette's limit). Neither KServe's app nor the passthrough has one."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.streamed = RequestBodyLimitMiddleware(app, limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.limit:
                message = f"request body of {int(declared)} bytes; the limit is {self.limit} (max_request_size)"
                await respond(send, 413, orjson.dumps({"error": message}))
                return
        await self.streamed(scope, receive, send)


class InferPassthrough:
    """JSON infer on a served model goes to TorchServe untouched; everything else to `app` (KServe's)."""

    def __init__(self, app: ASGIApp, models: set[str], upstream: Upstream) -> None:
        self.app = app
        self.models = models
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = self._model(scope)
        if model is None:
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        authorization = dict(scope["headers"]).get(b"authorization")
        try:
            status, answer = await self.upstream.post(self.upstream.infer_url(model), bytes(body),
                                                      authorization.decode() if authorization else None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            await respond(send, 502, orjson.dumps({"error": f"TorchServe did not answer: {exc!r}"}))
            return
        if status != 200:  # KServe's error form, TorchServe's status (400 bad input, 413 too large, 503 busy)
            answer = orjson.dumps({"error": error_message(answer) or f"TorchServe answered {status}"})
        await respond(send, status, answer)

    def _model(self, scope: Scope) -> str | None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        match = INFER_PATH.match(scope["path"])
        if match is None or match.group(1) not in self.models:
            return None
        if any(name == BINARY_HEADER for name, _ in scope["headers"]):
            return None
        return match.group(1)
