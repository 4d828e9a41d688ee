"""MiniLM sentence embeddings: parity with sentence-transformers, in-process and through a real TorchServe."""

from __future__ import annotations

import base64
import json
import os
import re
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml
from ts.context import Context, RequestProcessor

from export.models.minilm import model_dir
from handlers.autoselect import EMBEDDING_COSINE
from loadtest.serving import selection
from tests.conftest import StartServer, built_archive
from tsforge.serving.server import TorchServe

#: whole models exported, trained or served from their own archives: `make test` runs these, test-fast does not
pytestmark = pytest.mark.slow

MODEL = "minilm"
LONG = " ".join(["The quick brown fox jumps over the lazy dog near the riverbank."] * 40)  # > 256 tokens
SENTENCES = [
    "Hello",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Ünïcödé, emoji 🚀 and numbers 12345 are tokenized as well.",
    "TorchServe batches requests of different lengths; padding must not change any embedding.",
    "Sentence embeddings map text to a vector space where similar meanings lie close together, "
    "which makes semantic search, clustering and deduplication cheap at query time.",
    LONG,
]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """sentence-transformers' own pipeline on the package's model folder: the figure to match."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir()), device="cpu")
    embeddings: np.ndarray = model.encode(SENTENCES, convert_to_numpy=True)
    return embeddings


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("minilm_mar")
    with zipfile.ZipFile(built_archive(MODEL)) as archive:
        archive.extractall(target)
    return target


def make_context(model_dir: Path, batch: int) -> Context:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    context = Context(MODEL, str(model_dir), manifest, batch, None, "0.12.0",
                      model_yaml_config=yaml.safe_load((model_dir / "model-config.yaml").read_text()))
    context.request_processor = [RequestProcessor({}) for _ in range(batch)]
    return context


@pytest.fixture(scope="module")
def handler(unpacked: Path) -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(unpacked))
        from text_handler import TextEmbeddingHandler  # the copy inside the archive

        instance = TextEmbeddingHandler()
        instance.initialize(make_context(unpacked, 1))
        yield instance


def run(handler: Any, unpacked: Path, rows: list[dict[str, Any]],
        http_headers: dict[str, str] | None = None) -> tuple[list[int], list[Any]]:
    """`http_headers`: what TorchServe's HTTP front passes with each row (its gRPC bridge passes none)."""
    context = make_context(unpacked, len(rows))
    if http_headers:
        context.request_processor = [RequestProcessor(dict(http_headers)) for _ in rows]
    bodies = [json.loads(b) for b in handler.handle(rows, context)]
    return [context.get_response_status(i)[0] for i in range(len(rows))], bodies


def test_one_padded_batch_matches_sentence_transformers(handler, unpacked: Path, reference: np.ndarray) -> None:
    statuses, bodies = run(handler, unpacked, [{"body": s} for s in SENTENCES])
    assert statuses == [200] * len(SENTENCES)
    served = np.array([b["embedding"] for b in bodies])
    assert served.shape == (len(SENTENCES), 384) and all(b["dim"] == 384 for b in bodies)
    similarity = cosine(served, reference)
    precision = handler.selection["precision"]
    print(f"MiniLM parity vs sentence-transformers ({handler.selection['variant']}): min cosine {similarity.min():.7f}")
    assert similarity.min() >= EMBEDDING_COSINE[precision]
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


def test_every_payload_form_gives_the_same_embedding(handler, unpacked: Path, reference: np.ndarray) -> None:
    text = SENTENCES[2]
    rows: list[dict[str, Any]] = [
        {"body": text},                                   # text/plain body
        {"body": text.encode()},                          # octet-stream / --data-binary
        {"body": {"text": text}},
        {"body": {"data": text}},
        {"body": {"inputs": text}},
        {"body": json.dumps(text).encode()},              # a JSON string sent without a JSON content type
        {"body": {"instances": [text, SENTENCES[0]]}},
        {"body": {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": [text, SENTENCES[0]]}]}},
        # as TorchServe's gRPC ModelInfer bridge sends it: "model_name" added, BYTES elements base64-encoded
        {"body": {"model_name": MODEL, "id": "g", "inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(text.encode()).decode()]}]}},
    ]
    statuses, bodies = run(handler, unpacked, rows)
    assert statuses == [200] * len(rows)
    bound = EMBEDDING_COSINE[handler.selection["precision"]]
    singles = np.array([b["embedding"] for b in bodies[:6]])
    assert cosine(singles, reference[2]).min() >= bound
    pair = np.array([p["embedding"] for p in bodies[6]["predictions"]])
    assert cosine(pair, reference[[2, 0]]).min() >= bound
    v2 = bodies[7]["outputs"][0]
    assert v2["name"] == "output" and v2["shape"] == [2, 384] and v2["datatype"] == "FP32"
    assert cosine(np.array(v2["data"]).reshape(2, 384), reference[[2, 0]]).min() >= bound
    grpc_style = bodies[8]["outputs"][0]
    assert bodies[8]["id"] == "g" and cosine(np.array(grpc_style["data"]), reference[2]).min() >= bound


def test_v2_text_stays_text_over_http_even_with_a_model_name(handler, unpacked: Path,
                                                               reference: np.ndarray) -> None:
    """KServe's REST client puts "model_name" in the body; only TorchServe's gRPC bridge (no HTTP headers) means
    base64. An input marked `content_type: base64` (the v2 front's form for raw gRPC bytes) is decoded anywhere."""
    text = SENTENCES[1]
    marked = {"name": "text", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(text.encode()).decode()],
              "parameters": {"content_type": "base64"}}
    rows = [{"body": {"model_name": MODEL, "id": "k", "inputs": [
                {"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}},
            {"body": {"inputs": [marked]}}]
    statuses, bodies = run(handler, unpacked, rows, http_headers={"Host": "127.0.0.1:8080",
                                                                  "Content-Type": "application/json"})
    assert statuses == [200, 200], bodies
    bound = EMBEDDING_COSINE[handler.selection["precision"]]
    for body in bodies:
        assert cosine(np.array(body["outputs"][0]["data"]), reference[1]).min() >= bound
    statuses, bodies = run(handler, unpacked, rows[:1])  # the same body from the gRPC bridge: not base64
    assert statuses == [400] and "base64" in json.dumps(bodies[0])


def test_bad_rows_get_their_own_4xx_and_the_good_ones_their_embedding(handler, unpacked: Path) -> None:
    limit = handler.max_chars
    rows = [{"body": ""}, {"body": "   \n"}, {"body": "x" * (limit + 1)}, {"body": {"text": 5}},
            {"body": b"\xff\xfe\x00bad"}, {"body": {"sentence": "no known key"}}, {"body": SENTENCES[1]}]
    statuses, bodies = run(handler, unpacked, rows)
    assert statuses == [422, 422, 413, 400, 400, 400, 200]
    assert [b.get("type") for b in bodies[:6]] == ["invalid_input", "invalid_input", "payload_too_large",
                                                   "undecodable_input", "undecodable_input", "undecodable_input"]
    assert str(limit) in bodies[2]["message"] and "text" in bodies[5]["message"]
    assert len(bodies[6]["embedding"]) == 384


# ---- through TorchServe --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(start_server: StartServer) -> TorchServe:
    built_archive(MODEL)
    return start_server([MODEL])


def batch_sizes(server: TorchServe) -> list[float]:
    """The handler's HandlerBatchSize metric lines, from whichever of the server's logs records them."""
    text = "".join(log.read_text(errors="replace") for log in (server.run_dir / "logs").glob("*.log"))
    return [float(v) for v in re.findall(r"HandlerBatchSize\.\w+:([0-9.]+)", text)]


@pytest.mark.integration
def test_concurrent_requests_of_different_lengths_match_offline(server: TorchServe, reference: np.ndarray) -> None:
    config = yaml.safe_load((Path(__file__).parent.parent / "config" / "models" / f"{MODEL}.yaml").read_text())
    assert config["batchSize"] > 1
    url = f"{server.url('inference')}/predictions/{MODEL}"
    encodings = [
        lambda s: {"data": s.encode(), "headers": {"Content-Type": "text/plain; charset=utf-8"}},
        lambda s: {"json": {"text": s}},
        lambda s: {"data": json.dumps({"inputs": s}).encode(), "headers": {"Content-Type": "application/octet-stream"}},
    ]
    jobs = [(i, encodings[n % len(encodings)](SENTENCES[i])) for n, i in enumerate(list(range(len(SENTENCES))) * 3)]

    def send(job: tuple[int, dict[str, Any]]) -> tuple[int, requests.Response]:
        return job[0], requests.post(url, timeout=120, **job[1])

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, jobs))
    assert [r.status_code for _, r in answers] == [200] * len(jobs), answers[0][1].text
    served = np.array([r.json()["embedding"] for _, r in answers])
    expected = reference[[i for i, _ in answers]]
    precision = selection(server, MODEL)["precision"]
    assert cosine(served, expected).min() >= EMBEDDING_COSINE[precision]
    if precision == "fp32":
        assert np.abs(served - expected).max() < 1e-3
    deadline = time.monotonic() + 15  # the model log is written asynchronously
    while max(batch_sizes(server), default=0) <= 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert max(batch_sizes(server), default=0) > 1, "TorchServe never formed a batch of more than one request"


@pytest.mark.integration
def test_served_bad_input_is_a_json_4xx_and_the_worker_stays(server: TorchServe) -> None:
    url = f"{server.url('inference')}/predictions/{MODEL}"
    empty = requests.post(url, json={"text": ""}, timeout=30)
    assert empty.status_code == 422 and empty.json()["type"] == "invalid_input"
    wrong = requests.post(url, json={"text": ["a", "list"]}, timeout=30)
    assert wrong.status_code == 400 and "string" in wrong.json()["message"]
    good = requests.post(url, data=b"still serving", headers={"Content-Type": "text/plain"}, timeout=30)
    assert good.status_code == 200 and good.json()["dim"] == 384
