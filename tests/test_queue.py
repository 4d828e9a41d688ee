"""The job queue against a real TorchServe: a full queue is named as such (the v2 front's 503 body, the
management API's queue status that `make metrics` prints), and the shipped profile takes a burst of 1,024
concurrent requests without one 503 (issue 19)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ROOT, STORE, StartServer, built_archive
from tests.test_reliability import fault_archive
from tsforge.serving import frontproc, jobqueue
from tsforge.serving.server import TorchServe

pytestmark = pytest.mark.integration

TINY_QUEUE = 8
BURST = 1024
BURST_BOUND_S = 120.0  # the whole burst, answers included; 1,024 digits take a few seconds on 2 cores


def test_torchserve_words_for_a_full_queue_become_a_message_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    words = ('{"code": 503, "type": "ServiceUnavailableException", "message": "Model \\"digits\\" has no worker to '
             'serve inference request. Please use scale workers API to add workers."}')
    monkeypatch.setenv(jobqueue.SIZE_ENV, "2048")
    assert jobqueue.is_queue_full(503, words) and not jobqueue.is_queue_full(503, "worker died")
    assert not jobqueue.is_queue_full(500, words)
    v1 = json.loads(jobqueue.queue_full_body("/predictions/digits/1.0", v2=False))
    assert v1["code"] == 503 and "model digits: the job queue is full (2048 requests" in v1["message"]
    v2 = json.loads(jobqueue.queue_full_body("/v2/models/digits/infer", v2=True))
    assert v2 == {"error": jobqueue.queue_full_message("digits", 2048)}
    assert jobqueue.model_of("/v1/models/resnet18:predict") == "resnet18"
    monkeypatch.delenv(jobqueue.SIZE_ENV)
    assert jobqueue.queue_size() == jobqueue.JOB_QUEUE_SIZE
    assert jobqueue.queue_size({"job_queue_size": "9"}) == 9


async def burst(url: str, body: bytes, content_type: str, count: int) -> list[tuple[int, str]]:
    """`count` requests at once, each on its own connection: (status, body) of each, within BURST_BOUND_S."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=BURST_BOUND_S)) as s:

        async def one() -> tuple[int, str]:
            async with s.post(url, data=body, headers={"Content-Type": content_type}) as answer:
                return answer.status, await answer.text()

        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), BURST_BOUND_S)


def digit_png() -> bytes:
    from sklearn.datasets import load_digits

    from tests.v2_inputs import png

    return png((load_digits().images[7] * 16).clip(0, 255))


@pytest.fixture(scope="module")
def tiny(start_server: StartServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TorchServe, str]]:
    """`queued` (one worker whose first batch sleeps 2 s) behind a profile queue of TINY_QUEUE, with the v2 front."""
    store = tmp_path_factory.mktemp("queue_store")
    fault_archive(store, "queued", {"sleep_s": 2, "slow_batches": 1}, minWorkers=1, maxWorkers=1, batchSize=1)
    server = start_server(["queued"], store=store, overrides={"job_queue_size": str(TINY_QUEUE)})
    rest = frontproc.start(server.run_dir, server.props, server.url("inference"), ["queued"], None, timeout=120)
    yield server, rest
    server.stop()


def test_a_full_queue_is_named_by_the_front_and_the_queue_status(tiny: tuple[TorchServe, str]) -> None:
    server, rest = tiny
    image = base64.b64encode(digit_png()).decode()
    body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]}).encode()

    async def bursts_and_look() -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[str]]:
        """64 requests through the front and 64 to TorchServe's own port, at once, into one queue of TINY_QUEUE."""
        front = asyncio.gather(burst(f"{rest}/v2/models/queued/infer", body, "application/json", 64),
                               burst(f"{server.url('inference')}/predictions/queued", digit_png(), "image/png", 64))
        await asyncio.sleep(0.5)  # the worker sleeps 2 s on its first batch: the queue is full meanwhile
        lines = await asyncio.to_thread(jobqueue.queue_lines, server.url("management"), server.auth("management"))
        via_front, direct = await front
        return via_front, direct, lines

    via_front, direct, lines = asyncio.run(bursts_and_look())
    statuses = [status for status, _ in via_front + direct]
    assert set(statuses) == {200, 503}, statuses
    assert statuses.count(200) <= TINY_QUEUE + 2  # the queue, the batch the worker holds, one being formed
    refused = {text for status, text in via_front if status == 503}
    assert refused == {json.dumps({"error": jobqueue.queue_full_message("queued", TINY_QUEUE)})}, refused
    assert f"  queued 1.0: {TINY_QUEUE} / {TINY_QUEUE}  FULL" in lines, lines
    # TorchServe's own port keeps the Java frontend's words, and counts the refusals in Requests5XX
    assert all(jobqueue.TORCHSERVE_WORDS in text for status, text in direct if status == 503)
    from tsforge.serving.metrics import scrape

    counted = sum(sample.value for sample in scrape(server).get("Requests5XX", []))
    assert counted >= statuses.count(503), counted


def test_the_shipped_profile_answers_a_burst_of_1024_without_a_503(start_server: StartServer) -> None:
    built_archive("digits")
    server = start_server(["digits"], store=STORE)
    assert server.props["job_queue_size"] == str(2 * BURST)  # tsforge.serving.jobqueue.JOB_QUEUE_SIZE, as shipped
    started = time.monotonic()
    answers = asyncio.run(burst(f"{server.url('inference')}/predictions/digits", digit_png(), "image/png", BURST))
    took = time.monotonic() - started
    failed = [(status, text[:200]) for status, text in answers if status != 200]
    assert not failed, f"{len(failed)} of {BURST} failed, e.g. {failed[:3]}"
    assert {json.loads(text)["label"] for _, text in answers} == {"7"}
    assert took < BURST_BOUND_S
    server.stop()


def test_prod_profile_ships_the_same_queue(tmp_path: Path) -> None:
    for profile in ("config.properties", "prod.properties"):
        server = TorchServe(config=ROOT / "config" / profile, run_dir=tmp_path / profile)
        assert int(server.props["job_queue_size"]) >= BURST  # the one size (tests/test_configs.py: all agree)
