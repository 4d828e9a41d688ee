"""The wire protocols (handlers/protocols.py) and the batch steps of handlers/base.py in-process, with a small
handler of real parts: TorchServe's own Context, a torch model, JSON payloads, structured rows from `unbatch`."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from ts.context import Context, RequestProcessor

from handlers import oip, protocols
from handlers.base import BatchHandler
from handlers.errors import InvalidInput, RequestError
from handlers.payload import as_array
from handlers.telemetry import Telemetry


class PairHandler(BatchHandler):
    """Two numbers in; their sum and product out as a dict per row, so `unbatch` is not the default's."""

    def decode(self, payload: Any) -> torch.Tensor:
        array = as_array(payload)
        if array.shape != (2,):
            raise InvalidInput(f"expected 2 numbers; got shape {list(array.shape)}")
        return torch.from_numpy(array)

    def infer(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": batch.sum(dim=1), "product": batch.prod(dim=1)}

    def unbatch(self, output: dict[str, torch.Tensor], count: int) -> list[Any]:
        return [{"sum": float(s), "product": float(p)} for s, p in zip(output["sum"], output["product"], strict=True)]

    def encode(self, row: dict[str, float]) -> dict[str, float]:
        if row["product"] < 0:  # stands for an encoder that refuses a result
            raise InvalidInput("a negative product cannot be answered")
        if row["sum"] == 99:  # stands for an encoder bug
            raise KeyError("bug")
        return row

    def encode_v2(self, rows: Any) -> list[dict[str, Any]]:
        return [oip.output_tensor("sum", np.array([r["sum"] for r in rows], dtype=np.float32))]


def context_for(batch: int) -> Context:
    manifest = {"model": {"modelName": "pairs", "modelVersion": "1.0"}}
    context = Context("pairs", ".", manifest, batch, None, "0.12.0", model_yaml_config={})
    context.request_processor = [RequestProcessor({}) for _ in range(batch)]
    return context


@pytest.fixture()
def handler() -> PairHandler:
    """What `initialize` sets, without an archive to load (the model is `infer` itself)."""
    instance = PairHandler()
    instance.context, instance.config, instance.device = context_for(1), {}, torch.device("cpu")
    instance.version, instance.selection = "1.0", {}
    instance.telemetry = Telemetry(instance.context, version="1.0")
    return instance


def v2(name: str, rows: list[list[float]], request_id: str = "r") -> dict[str, Any]:
    return {"id": request_id, "inputs": [{"name": name, "shape": [len(rows), 2], "datatype": "FP32",
                                          "data": [x for row in rows for x in row]}]}


def test_handle_answers_each_request_in_its_protocol_and_isolates_the_bad(handler: PairHandler) -> None:
    rows = [{"body": json.dumps([1, 2]).encode()}, {"body": {"instances": [[1, 1], [2, 3]]}},
            {"body": v2("x", [[2, 2], [3, 3]])}, {"body": {"instances": [[1, 1], [1, 2, 3]]}},
            {"body": {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}},
            {"body": {"data": [-1, 2]}}, {"body": {"data": [49, 50]}}, {"body": b"\x00junk"}]
    context = context_for(len(rows))
    out = [json.loads(body) for body in handler.handle(rows, context)]
    statuses = [context.get_response_status(i)[0] for i in range(len(rows))]
    assert statuses == [200, 200, 200, 422, 422, 422, 500, 400]
    assert out[0] == {"sum": 3.0, "product": 2.0}
    assert out[1] == {"predictions": [{"sum": 2.0, "product": 1.0}, {"sum": 5.0, "product": 6.0}]}
    assert out[2]["id"] == "r" and out[2]["outputs"][0] == {"name": "sum", "shape": [2], "datatype": "FP32",
                                                            "data": [4.0, 6.0]}
    assert out[3]["message"] == "instance 1: expected 2 numbers; got shape [3]"
    assert out[4]["message"] == "input 'x' item 0: expected 2 numbers; got shape [3]"
    assert out[4]["outputs"][0]["name"] == "error" and out[4]["model_name"] == "pairs"  # v2 errors are v2 answers
    assert out[5]["type"] == "invalid_input" and out[6]["type"] == "internal_error"
    assert all(context.get_response_headers(i).get("X-Model-Version") == "1.0" for i in range(len(rows)))


def test_an_unbatch_with_the_wrong_row_count_is_a_500_for_its_batch_only(handler: PairHandler) -> None:
    handler.unbatch = lambda output, count: []  # type: ignore[method-assign]
    context = context_for(2)
    out = [json.loads(b) for b in handler.handle([{"body": [1, 2]}, {"body": b"junk"}], context)]
    assert [context.get_response_status(i)[0] for i in range(2)] == [500, 400]
    assert "unbatch returned 0 rows for a batch of 1 items" in out[0]["message"]


def test_the_default_unbatch_gives_float_cpu_rows_or_the_list(handler: PairHandler) -> None:
    rows = BatchHandler.unbatch(handler, torch.ones(3, 2, dtype=torch.float16), 3)
    assert len(rows) == 3 and all(r.dtype == torch.float32 and r.shape == (2,) for r in rows)
    assert BatchHandler.unbatch(handler, ({"a": 1}, {"a": 2}), 2) == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize(("payload", "name"), [
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}, "v2"),
    ({"inputs": []}, "v2"),
    ({"instances": [1]}, "kserve-v1"),
    ({"inputs": [1, 2]}, "plain"),  # the v1-style envelope, not a v2 body
    (b"\x89PNG", "plain"),
    ([1, 2], "plain"),
])
def test_pick_finds_the_protocol_of_a_payload(payload: Any, name: str) -> None:
    assert protocols.pick(payload).name == name


def test_a_v2_request_without_items_is_a_422(handler: PairHandler) -> None:
    with pytest.raises(InvalidInput, match="holds no items"):
        protocols.OpenInference().decode({"inputs": [{"name": "x", "shape": [0, 2], "datatype": "FP32", "data": []}]},
                                         handler)


def test_decode_request_reads_every_protocol_for_examples_and_held_out_inputs(handler: PairHandler) -> None:
    assert len(handler.decode_request([1, 2])) == 1
    assert len(handler.decode_request({"instances": [[1, 2], [3, 4]]})) == 2
    assert len(handler.decode_request(v2("x", [[1, 2], [3, 4], [5, 6]]))) == 3
    with pytest.raises(RequestError, match="instance 0"):
        handler.decode_request({"instances": [[1]]})


def test_dumps_writes_the_same_values_as_json() -> None:
    embedding = torch.nn.functional.normalize(torch.randn(384), dim=0).numpy()
    body = {"embedding": embedding.tolist(), "dim": 384, "label": "café", "probabilities": {"7": 1e-06}}
    assert json.loads(protocols.dumps(body)) == json.loads(json.dumps(body)) == body  # only the digits' form differs


def test_dumps_falls_back_to_json_for_what_orjson_refuses() -> None:
    assert json.loads(protocols.dumps({"big": 1 << 70, 3: "x"})) == {"big": 1 << 70, "3": "x"}

