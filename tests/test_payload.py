"""The decoders alone: every wrapper a client uses, and only documented errors for anything else."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.errors import RequestError
from handlers.payload import as_array, as_bytes, as_text, extract, unwrap

BLOB = bytes(range(256)) * 3


@pytest.mark.parametrize("wrapped", [
    BLOB,
    bytearray(BLOB),
    base64.b64encode(BLOB).decode(),
    base64.b64encode(BLOB),
    base64.urlsafe_b64encode(BLOB).decode(),
    base64.b64encode(BLOB).decode().rstrip("="),
    base64.urlsafe_b64encode(BLOB).decode().rstrip("="),
    "\n".join(base64.encodebytes(BLOB).decode().split("\n")),
    "  " + base64.b64encode(BLOB).decode() + "\r\n",
    "data:image/png;base64," + base64.b64encode(BLOB).decode(),
    {"data": base64.b64encode(BLOB).decode()},
    {"inputs": {"b64": base64.b64encode(BLOB).decode()}},
    {"b64": base64.urlsafe_b64encode(BLOB).decode()},
    json.dumps({"data": base64.b64encode(BLOB).decode()}).encode(),
])
def test_every_binary_wrapper_gives_the_same_bytes(wrapped: object) -> None:
    assert as_bytes(wrapped) == BLOB


@pytest.mark.parametrize("row", [{"body": BLOB}, {"data": BLOB}, {"file": BLOB}, {"anything": None, "img": BLOB}])
def test_extract_finds_the_payload_under_any_field(row: dict[str, object]) -> None:
    assert extract(row) == BLOB


def test_arrays_from_json_and_npy() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    buffer = io.BytesIO()
    np.save(buffer, array)
    for payload in (array.tolist(), buffer.getvalue(), base64.b64encode(buffer.getvalue()).decode(),
                    {"data": array.tolist()}):
        assert np.array_equal(as_array(payload), array)


@pytest.mark.parametrize("bad", [[[1, 2], [3]], [1, "a"], [float("nan")], {"x": 1}, "%%%", True])
def test_bad_arrays_are_request_errors(bad: object) -> None:
    with pytest.raises(RequestError):
        as_array(bad)


def test_text() -> None:
    assert as_text("héllo") == as_text("héllo".encode()) == as_text({"text": "héllo"}) == "héllo"
    with pytest.raises(RequestError):
        as_text(b"\xff\xfe\xfa")


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=512), st.text(max_size=256),
                 st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=20) | st.integers(),
                              lambda children: st.lists(children, max_size=4)
                              | st.dictionaries(st.sampled_from(["data", "inputs", "b64", "x"]), children,
                                                max_size=3), max_leaves=10)))
def test_random_input_only_raises_documented_errors(value: object) -> None:
    for decoder in (as_bytes, as_text, as_array, unwrap):
        try:
            decoder(value)
        except RequestError as exc:
            assert exc.status in (400, 413, 422) and exc.message
