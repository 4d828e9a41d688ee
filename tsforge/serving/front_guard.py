"""Request bodies that TorchServe's frontend would choke on, refused by the front before they reach it.

TorchServe 0.12's frontend (netty 4.1.53, no longer fixed) decodes `application/x-www-form-urlencoded` and
`multipart/form-data` bodies itself, before any handler sees them, and its decoder slows down badly with the
number of fields: a 6 MB body of 800,000 tiny fields costs it about 12 s of CPU (issue 19), and four clients
sending such bodies held everyone else to 1 req/s. Counting the fields is one `bytes.count` per chunk, so the front
counts them as the body streams in and answers 413 as soon as the count passes `max_fields`, a few kilobytes in.
The rest of the body costs the front next to nothing: once a response is complete, uvicorn's parser drops the body
bytes still arriving without waking the app (reading them chunk by chunk through the app cost the front half of
digits' rate under four flooders), and it keeps the connection, so the client finishes sending and then reads
the 413, a second late (front_rest.REFUSAL_DELAY_S). The size limit itself is front_rest.BodyLimit's, outside
this wrapper.
"""

from __future__ import annotations

import asyncio
import re

import orjson

from tsforge.serving.front_rest import REFUSAL_DELAY_S, ASGIApp, Message, Receive, Scope, Send, respond

URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
#: the default field limit: far above any real form (a digit image is one field), far below what hurts netty
MAX_FORM_FIELDS = 1000
BOUNDARY = re.compile(r"""boundary=(?:"([^"]+)"|([^\s;]+))""", re.IGNORECASE)


class FieldCounter:
    """Counts the fields of a form body chunk by chunk: `&` separators, or multipart delimiter lines."""

    def __init__(self, separator: bytes, fields_before_first: int) -> None:
        self.separator = separator
        self.fields = fields_before_first
        self._tail = b""  # the end of the last chunk, where a delimiter may begin (shorter than one delimiter)

    @classmethod
    def for_content_type(cls, content_type: str) -> FieldCounter | None:
        """A counter for the form types netty decodes; None for any other body. ValueError for a multipart body
        without a boundary (netty could not split it either)."""
        kind = content_type.split(";", 1)[0].strip().lower()
        if kind == URLENCODED:
            return cls(b"&", 1)  # n separators, n + 1 fields
        if kind != MULTIPART:
            return None
        found = BOUNDARY.search(content_type)
        if not found:
            raise ValueError("a multipart/form-data body needs a boundary parameter in its Content-Type")
        # `--B` opens every part and `--B--` closes the body: n parts, n + 1 delimiters
        return cls(b"--" + (found.group(1) or found.group(2)).encode(), -1)

    def feed(self, chunk: bytes) -> int:
        if len(self.separator) == 1:
            self.fields += chunk.count(self.separator)
            return self.fields
        # A match in tail + chunk ends inside the chunk (the tail is shorter than the delimiter): none counted twice.
        window = self._tail + chunk
        self.fields += window.count(self.separator)
        self._tail = window[-(len(self.separator) - 1):]
        return self.fields


class FormFieldLimit:
    """413, with a JSON error, for a form body of more than `max_fields` fields; every other body goes on
    untouched (the counted ones replayed whole to `app`)."""

    def __init__(self, app: ASGIApp, max_fields: int = MAX_FORM_FIELDS) -> None:
        self.app = app
        self.max_fields = max_fields

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        try:
            counter = FieldCounter.for_content_type(content_type)
        except ValueError as exc:
            await respond(send, 400, orjson.dumps({"error": str(exc)}))
            return
        if counter is None:
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if counter.feed(chunk) > self.max_fields:
                kind = content_type.split(";", 1)[0].strip()
                error = (f"form body ({kind}) of more than {self.max_fields} fields; the limit is {self.max_fields} "
                         "(front_max_form_fields): send the input as one field, or as the raw body")
                await asyncio.sleep(REFUSAL_DELAY_S)  # front_rest.REFUSAL_DELAY_S says why
                await respond(send, 413, orjson.dumps({"error": error}))
                return
            body += chunk
            if not message.get("more_body"):
                break
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the already-read body once, then whatever the connection says next (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
