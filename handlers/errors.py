"""Errors that a request can cause, each answered with its own 4xx and a JSON body.

    RequestError (400)                 base: answered to the one request, the batch goes on
    ├── UndecodableInput (400)         not a format this handler reads
    ├── InvalidInput (422)             decoded, but of the wrong shape, type or range
    └── PayloadTooLarge (413)          more pixels, bytes or tokens than the configured limit

Anything else raised while serving a batch is a server fault: the requests it touched get a 500
with type "internal_error"; the worker stays up.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar


class RequestError(Exception):
    status: ClassVar[int] = 400
    kind: ClassVar[str] = "bad_request"
    phrase: ClassVar[str] = "Bad Request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, Any]:
        return {"code": self.status, "type": self.kind, "message": self.message}


class UndecodableInput(RequestError):
    kind = "undecodable_input"


class InvalidInput(RequestError):
    status = 422
    kind = "invalid_input"
    phrase = "Unprocessable Entity"


class PayloadTooLarge(RequestError):
    status = 413
    kind = "payload_too_large"
    phrase = "Payload Too Large"


def internal_error_body(exc: BaseException) -> bytes:
    body = {"code": 500, "type": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
    return json.dumps(body).encode()
