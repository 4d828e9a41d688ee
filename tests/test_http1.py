"""The load generator's HTTP/1.1 client against a real HTTP server in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loadtest.http1 import Http1Client, ProtocolError


class Echo(BaseHTTPRequestHandler):
    """POST /plain echoes the body with its headers; /chunked answers in chunks; /close closes after answering."""

    protocol_version = "HTTP/1.1"
    seen_headers: list[list[str]] = []
    connections: set[int] = set()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Echo.seen_headers.append(sorted(k.lower() for k in self.headers))
        Echo.connections.add(self.client_address[1])
        answer = self.headers["Content-Type"].encode() + b"|" + body
        if self.path == "/garbage":
            self.wfile.write(b"NOT-HTTP\r\n\r\n")
            return
        self.send_response(404 if self.path == "/missing" else 200)
        if self.path == "/chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (answer[:3], answer[3:]):
                self.wfile.write(f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(answer)))
        if self.path == "/close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def exchange(url: str, bodies: list[bytes]) -> list[tuple[int, bytes]]:
    async def run() -> list[tuple[int, bytes]]:
        client = Http1Client(url)
        try:
            return [await client.send(body, "image/png") for body in bodies]
        finally:
            client.close()

    return asyncio.run(run())


def test_bodies_of_any_size_over_one_kept_alive_connection(base_url: str) -> None:
    Echo.connections.clear()
    bodies = [b"", b"x", bytes(range(256)) * 4000]
    assert exchange(base_url + "/plain", bodies) == [(200, b"image/png|" + b) for b in bodies]
    assert len(Echo.connections) == 1


def test_only_host_type_and_length_are_sent(base_url: str) -> None:
    Echo.seen_headers.clear()
    exchange(base_url + "/plain", [b"1"])
    assert Echo.seen_headers == [["content-length", "content-type", "host"]]


def test_chunked_answers_and_error_statuses_are_read(base_url: str) -> None:
    assert exchange(base_url + "/chunked", [b"abcdef", b"g"]) == [(200, b"image/png|abcdef"), (200, b"image/png|g")]
    assert exchange(base_url + "/missing", [b"?"]) == [(404, b"image/png|?")]


def test_a_closed_connection_is_reopened_for_the_next_request(base_url: str) -> None:
    Echo.connections.clear()
    assert exchange(base_url + "/close", [b"a", b"b", b"c"]) == [(200, b"image/png|" + b) for b in (b"a", b"b", b"c")]
    assert len(Echo.connections) == 3


def test_an_answer_that_is_not_http_is_an_error_and_the_next_request_reconnects(base_url: str) -> None:
    async def run() -> tuple[Exception | None, tuple[int, bytes]]:
        garbage, plain = Http1Client(base_url + "/garbage"), Http1Client(base_url + "/plain")
        error = None
        try:
            await garbage.send(b"x", "image/png")
        except ProtocolError as exc:
            error = exc
        assert garbage.connection is not None and garbage.connection.closed
        garbage.head, garbage.port = plain.head, plain.port  # same server, a path that answers properly
        try:
            return error, await garbage.send(b"y", "image/png")
        finally:
            garbage.close()

    error, answer = asyncio.run(run())
    assert error is not None and "not an HTTP/1.x status line" in str(error)
    assert answer == (200, b"image/png|y")


def test_only_plain_http_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="need an http:// URL"):
        Http1Client("https://127.0.0.1/predictions/digits")


def test_a_request_abandoned_midway_does_not_leak_into_the_next(base_url: str) -> None:
    async def run() -> tuple[int, bytes]:
        client = Http1Client(base_url + "/plain")
        try:
            await client.send(b"first", "image/png")  # connected: the abandoned request below is mid-exchange
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.send(bytes(8_000_000), "image/png"), timeout=0.001)
            return await client.send(b"next", "image/png")
        finally:
            client.close()

    Echo.connections.clear()
    assert asyncio.run(run()) == (200, b"image/png|next")
    assert len(Echo.connections) == 2  # the out-of-step connection was replaced
