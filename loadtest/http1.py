"""A minimal HTTP/1.1 keep-alive client on asyncio protocols, for the load generator.

One connection per simulated user, one request in flight on it, a pre-built request head: it costs
the client a fraction of the CPU aiohttp does, which matters when client and server share a few
cores. It sends only Host, Content-Type and Content-Length (TorchServe hands every request header to
the worker, so extra headers are extra work for the server too), and reads Content-Length and
chunked bodies.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 this client understands."""


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.busy = False  # still set after an exchange that was abandoned midway: the stream is out of step

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        try:
            answer = _parse(self.buffer)
        except (ProtocolError, ValueError) as exc:  # a bad status line, length or chunk size
            if self.transport is not None:
                self.transport.close()  # the stream cannot be resynchronised: the next send reconnects
            self.closed = True
            self.waiter.set_exception(exc if isinstance(exc, ProtocolError) else ProtocolError(str(exc)))
            return
        if answer is not None:
            status, body, used, close = answer
            del self.buffer[:used]
            if close and self.transport is not None:
                self.transport.close()
            self.waiter.set_result((status, body))

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.busy = True
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        answer = await self.waiter
        self.busy = False
        return answer


def _parse(buffer: bytearray) -> tuple[int, bytes, int, bool] | None:
    """(status, body, bytes used, server closes) once a whole response is in `buffer`; None before."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    lines = bytes(buffer[:head_end]).split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    close = headers.get(b"connection", b"").lower() == b"close"
    start = head_end + 4
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        chunked = _dechunk(buffer, start)
        return None if chunked is None else (int(parts[1]), chunked[0], chunked[1], close)
    length = int(headers.get(b"content-length", b"0"))
    if len(buffer) < start + length:
        return None
    return int(parts[1]), bytes(buffer[start:start + length]), start + length, close


def _dechunk(buffer: bytearray, at: int) -> tuple[bytes, int] | None:
    body = bytearray()
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
        at = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", at - 2)
            return None if trailer_end < 0 else (bytes(body), trailer_end + 4)
        if len(buffer) < at + size + 2:
            return None
        body += buffer[at:at + size]
        at += size + 2


class Http1Client:
    """POSTs to one URL over one keep-alive connection, opened (and reopened) on demand."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"need an http:// URL, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.head = f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        self.connection: _Connection | None = None

    async def send(self, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        if self.connection is None or self.connection.closed or self.connection.busy:
            self.close()
            loop = asyncio.get_running_loop()
            _, self.connection = await loop.create_connection(_Connection, self.host, self.port)
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        request = (f"{self.head}Content-Type: {content_type}\r\n{extra}Content-Length: {len(body)}\r\n\r\n".encode()
                   + body)
        return await self.connection.exchange(request)

    def close(self) -> None:
        if self.connection is not None and self.connection.transport is not None:
            self.connection.transport.close()
        self.connection = None
