"""Turn whatever TorchServe hands a handler into bytes, text or an array.

TorchServe gives each request as a dict: `{"body": ...}` for a plain body, `{"data": ...}` from some
clients, one key per multipart form field, or the gRPC `input` map. Values arrive as bytes, as str
(for text/* bodies) or already parsed (for application/json bodies). Clients wrap payloads in JSON
envelopes (`{"data": x}`, `{"inputs": x}`, `{"b64": s}`), send base64 in any of its dialects, or
send JSON with a wrong content type; all of that is accepted here.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from handlers.errors import InvalidInput, UndecodableInput

ENVELOPE_KEYS = ("data", "inputs", "input", "b64", "bytes", "image", "text", "instance")
ACCEPTED_BINARY = (
    "raw bytes in the body or a multipart field; a base64 string (standard or URL-safe, padding "
    "optional, data: URI allowed); JSON {\"data\": ...}, {\"inputs\": ...}, {\"b64\": ...} or "
    "{\"instances\": [...]} wrapping either"
)
_BASE64_TEXT = re.compile(rb"^[A-Za-z0-9+/=_\-\s]+$")
_DATA_URI = re.compile(r"^data:[^,]*?(;base64)?,", re.IGNORECASE)
_NPY_MAGIC = b"\x93NUMPY"


def extract(row: Mapping[str, Any]) -> Any:
    """The payload of one TorchServe request row."""
    if not isinstance(row, Mapping):
        return row
    for key in ("body", "data"):
        if row.get(key) is not None:
            return row[key]
    for value in row.values():
        if value is not None:
            return value
    raise UndecodableInput(f"the request is empty; send {ACCEPTED_BINARY}")


def parse_json_bytes(value: bytes | bytearray) -> Any:
    """JSON sent with a non-JSON content type (curl -d, octet-stream); the bytes unchanged otherwise."""
    head = bytes(value[:64]).lstrip()
    if head[:1] in (b"{", b"[", b'"'):
        try:
            return json.loads(bytes(value))
        except (ValueError, UnicodeDecodeError):
            pass
    return value


def unwrap(value: Any) -> Any:
    """Strip JSON envelopes: {"data": x}, {"inputs": x}, {"b64": s} ... down to the payload."""
    for _ in range(8):  # envelopes nest at most a few levels; bound the loop against hostile input
        if isinstance(value, (bytes, bytearray)):
            parsed = parse_json_bytes(value)
            if parsed is value:
                return value
            value = parsed
            continue
        if isinstance(value, Mapping):
            key = next((k for k in ENVELOPE_KEYS if k in value), None)
            if key is None:
                keys = ", ".join(sorted(map(str, value))) or "none"
                raise UndecodableInput(
                    f"JSON object has no payload field (got keys: {keys}); expected one of "
                    f"{', '.join(ENVELOPE_KEYS)} or instances"
                )
            value = value[key]
            continue
        return value
    raise UndecodableInput("JSON envelopes are nested too deeply")


def decode_base64(text: str | bytes) -> bytes:
    """Decode base64 in any common dialect: standard or URL-safe, with or without padding,
    with whitespace or newlines, optionally as a `data:` URI."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise UndecodableInput(f"expected base64 text; got non-ASCII bytes. Send {ACCEPTED_BINARY}") from None
    match = _DATA_URI.match(text)
    if match:
        if not match.group(1):
            raise UndecodableInput("data: URI is not base64-encoded; use data:<type>;base64,<data>")
        text = text[match.end():]
    compact = "".join(text.split()).replace("-", "+").replace("_", "/").rstrip("=")
    if not compact:
        raise UndecodableInput(f"the base64 string is empty; send {ACCEPTED_BINARY}")
    if len(compact) % 4 == 1:
        raise UndecodableInput("the base64 string has an impossible length (truncated?)")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise UndecodableInput(f"the string is not valid base64; send {ACCEPTED_BINARY}") from None


def as_bytes(value: Any) -> bytes:
    """Binary payload (an image, an .npy file) from raw bytes or base64 text."""
    value = unwrap(value)
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        # Base64 sent as a binary body (curl --data-binary @photo.b64): no binary format is pure base64 text.
        if raw and _BASE64_TEXT.match(raw[:4096]) and _BASE64_TEXT.match(raw):
            return decode_base64(raw)
        if raw[:5].lower() == b"data:":  # a data: URI as the body; no binary format starts like that either
            return decode_base64(raw)
        return raw
    if isinstance(value, str):
        return decode_base64(value)
    raise UndecodableInput(f"expected binary data, got a JSON {_json_kind(value)}; send {ACCEPTED_BINARY}")


def as_text(value: Any) -> str:
    """A UTF-8 string from a text body, a JSON string or bytes."""
    value = unwrap(value)
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise UndecodableInput("the body is not UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise UndecodableInput(f"expected a string, got a JSON {_json_kind(value)}")


def is_numeric_json(value: Any) -> bool:
    return isinstance(value, (list, int, float)) and not isinstance(value, bool)


def as_array(value: Any, dtype: np.dtype[Any] | type = np.float32) -> np.ndarray[Any, Any]:
    """A numeric array from JSON (nested lists) or .npy bytes (raw or base64)."""
    value = unwrap(value)
    if is_numeric_json(value):
        try:
            array = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError):
            raise InvalidInput("the JSON array is ragged or holds non-numbers; expected a rectangular "
                               "array of numbers") from None
        if not np.isfinite(array).all():
            raise InvalidInput("the array holds NaN or infinite values")
        with np.errstate(over="ignore"):
            cast = array.astype(dtype)
        if cast.dtype.kind == "f" and not np.isfinite(cast).all():
            raise InvalidInput(f"the array holds values too large for {cast.dtype}")
        return cast
    raw = as_bytes(value)
    if not raw.startswith(_NPY_MAGIC):
        raise UndecodableInput("expected a JSON array of numbers or .npy bytes (raw or base64)")
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UndecodableInput(f"the .npy payload cannot be read: {exc}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise InvalidInput(f"the .npy array has dtype {getattr(array, 'dtype', '?')}; expected numbers")
    return array


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    if value is None:
        return "null"
    return type(value).__name__
