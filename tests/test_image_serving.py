"""Image classifiers through a real TorchServe: resnet18 (the variant `auto` chose at worker start) batching good
and bad requests together, answers equal to the same variant run offline; digits through the image handler for
real labels."""

from __future__ import annotations

import base64
import json
import os
import re
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from export.models.digits import to_tensor
from export.models.resnet import jpeg, sample_photos
from handlers.autoselect import REPRODUCIBILITY
from handlers.capabilities import cpu_capabilities
from handlers.images import ImagePreprocessor
from handlers.runtimes import compile_for_serving, onednn_fusion
from loadtest.serving import selection as served_selection
from tests.conftest import BUILD, ROOT, built_archive, offline_runner, png_bytes
from tests.test_images import bomb_png, save, with_orientation
from tsforge.packaging import archive
from tsforge.serving.server import TorchServe

pytestmark = pytest.mark.integration

BATCH = 12
BATCH_DELAY_MS = 4000  # long enough that a burst of BATCH requests always lands in one batch


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet18 with a test-specific model-config (batch of exactly BATCH, long delay), and digits_image."""
    built_archive("resnet18")
    built = built_archive("digits_image")
    target = tmp_path_factory.mktemp("image_store")
    config = yaml.safe_load((ROOT / "config" / "models" / "resnet18.yaml").read_text())
    config.update(batchSize=BATCH, maxBatchDelay=BATCH_DELAY_MS)
    config_file = target / "resnet18-batching.yaml"
    config_file.write_text(yaml.safe_dump(config))
    archive.main(["resnet18", "--config", str(config_file), "--store", str(target), "--build-dir", str(BUILD)])
    (target / built.name).write_bytes(built.read_bytes())
    return target


@pytest.fixture(scope="module")
def server(start_server, store: Path) -> TorchServe:
    started: TorchServe = start_server(["resnet18", "digits_image"], store=store)
    return started


@pytest.fixture(scope="module")
def offline(server: TorchServe, store: Path):
    """resnet18 as the server runs it (the variant its workers chose, same layout and freezing), run here
    in-process, and the bound within which the two agree for that variant's precision."""
    with zipfile.ZipFile(store / "resnet18.mar") as mar:
        settings = yaml.safe_load(mar.read("model-config.yaml"))["handler"]
        labels = json.loads(mar.read("index_to_name.json"))
    selection = served_selection(server, "resnet18")
    model = offline_runner("resnet18", selection, channels_last=settings["channels_last"])
    preprocess = ImagePreprocessor.from_config(settings)

    def predict(files: list[bytes]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.softmax(model(torch.stack([preprocess.tensor(f) for f in files])), dim=1)

    return predict, labels, settings["top_k"], REPRODUCIBILITY[selection["precision"]]


def worker_pids(server: TorchServe, model: str) -> list[int]:
    described = requests.get(f"{server.url('management')}/models/{model}", timeout=10).json()
    return sorted(w["pid"] for w in described[0]["workers"])


def metric(server: TorchServe, name: str, model: str, wait_s: float = 15.0) -> float:
    """The metric's value; the worker reports it through its log, which the frontend reads a moment later."""
    deadline = time.monotonic() + wait_s
    while True:
        text = requests.get(server.url("metrics") + "/metrics", params={"name[]": name}, timeout=10).text
        pattern = rf'^{name}{{[^}}]*ModelName="{model}"[^}}]*}} (\S+)$'
        found = [float(m.group(1)) for m in re.finditer(pattern, text, re.M)]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert found, f"{name} for {model} not in the metrics:\n{text}"
    return found[0]


def post(url: str, kwargs: dict[str, Any]) -> requests.Response:
    return requests.post(url, timeout=120, **kwargs)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_same_answer(answer: dict[str, Any], probabilities: torch.Tensor, labels: dict[str, str], top_k: int,
                       bound: float) -> None:
    """The served top-k are offline's top-k, each probability within `bound`; classes whose offline
    probabilities are closer than `bound` may swap places."""
    index = {name: int(i) for i, name in labels.items()}
    served = {index[name]: p for name, p in answer["probabilities"].items()}
    assert len(served) == top_k
    for i, p in served.items():
        assert abs(p - float(probabilities[i])) <= bound, (labels[str(i)], p, float(probabilities[i]))
    kth = float(torch.topk(probabilities, top_k).values[-1])
    assert all(float(probabilities[i]) >= kth - 2 * bound for i in served)
    assert float(probabilities[index[answer["label"]]]) >= float(probabilities.max()) - 2 * bound


def test_good_and_bad_requests_share_a_batch_and_only_the_bad_fail(server: TorchServe, offline) -> None:
    predict, labels, top_k, bound = offline
    photos = {name.split(".")[0]: photo for name, photo in sample_photos().items()}
    china, flower = jpeg(photos["china"]), jpeg(photos["flower"])
    flower_webp = save(Image.fromarray(photos["flower"]), "WEBP", quality=90)
    rotated = with_orientation(np.ascontiguousarray(np.rot90(photos["china"], 1)), 6)
    good: list[tuple[dict[str, Any], bytes]] = [
        ({"data": china}, china),
        ({"data": b64(flower)}, flower),
        ({"json": {"data": b64(china)}}, china),
        ({"files": {"image": ("flower.webp", flower_webp)}}, flower_webp),
        ({"data": "data:image/jpeg;base64," + b64(flower)}, flower),
        ({"data": rotated}, rotated),
        ({"json": {"instances": [{"b64": b64(china)}, b64(flower_webp)]}}, b""),
    ]
    bad: list[tuple[dict[str, Any], int, str]] = [
        ({"data": b"\x89PNG\r\n\x1a\n not really"}, 400, "undecodable_input"),
        ({"data": bomb_png(20_000, 20_000)}, 413, "payload_too_large"),
        ({"data": save(Image.new("RGB", (1, 40_000)), "PNG")}, 422, "invalid_input"),
        ({"json": {"pixels": [1, 2, 3]}}, 400, "undecodable_input"),
        ({"json": {"instances": [b64(china), "@@@"]}}, 400, "undecodable_input"),
    ]
    assert len(good) + len(bad) == BATCH
    url = server.url("inference") + "/predictions/resnet18"
    pids = worker_pids(server, "resnet18")
    calls = [kwargs for kwargs, _ in good[:4]] + [kwargs for kwargs, _, _ in bad] + [kwargs for kwargs, _ in good[4:]]
    started = time.monotonic()
    with ThreadPoolExecutor(BATCH) as pool:
        responses = list(pool.map(lambda kw: post(url, kw), calls))
    elapsed = time.monotonic() - started
    # A batch smaller than batchSize is only released after maxBatchDelay: answers sooner mean one full batch.
    assert elapsed < BATCH_DELAY_MS / 1000, f"{elapsed:.1f}s: the requests did not share one batch"
    assert metric(server, "HandlerBatchSize", "resnet18") == len(good) + 1  # the instances request holds two

    good_responses = responses[:4] + responses[4 + len(bad):]
    bad_responses = responses[4:4 + len(bad)]
    for response, (_, status, kind) in zip(bad_responses, bad, strict=True):
        assert response.status_code == status, response.text
        body = response.json()
        assert body["code"] == status and body["type"] == kind and body["message"]
    single = [(r, f) for r, (_, f) in zip(good_responses, good, strict=True) if f]
    assert all(r.status_code == 200 for r, _ in single), [r.text for r, _ in single]
    expected = predict([f for _, f in single] + [china, flower_webp])
    for (response, _), probabilities in zip(single, expected, strict=False):
        assert_same_answer(response.json(), probabilities, labels, top_k, bound)
    many = good_responses[-1]
    assert many.status_code == 200, many.text
    predictions = many.json()["predictions"]
    assert len(predictions) == 2
    for answer, probabilities in zip(predictions, expected[-2:], strict=True):
        assert_same_answer(answer, probabilities, labels, top_k, bound)
    assert worker_pids(server, "resnet18") == pids


def test_sample_photos_top1_equals_offline_and_the_archived_example(server: TorchServe, offline, store: Path) -> None:
    predict, labels, _, _ = offline
    files = [jpeg(photo) for photo in sample_photos().values()]
    with zipfile.ZipFile(store / "resnet18.mar") as mar:
        example = json.loads(mar.read("examples.json"))[0]
    url = server.url("inference") + "/predictions/resnet18"
    calls = [{"data": f} for f in files] + [{"json": example["input"]}]
    with ThreadPoolExecutor(len(calls)) as pool:
        responses = list(pool.map(lambda kw: post(url, kw), calls))
    assert [r.status_code for r in responses] == [200] * len(calls)
    offline_top1 = [labels[str(int(i))] for i in predict(files).argmax(1)]
    assert [r.json()["label"] for r in responses[:2]] == offline_top1
    # The archived label is fp32's on the export machine. The variant `auto` chose here (int8 on some CPUs, and
    # int8 kernels round differently from one CPU to the next) answers as it does offline; its top-1 is the
    # archived one when it is fp32 (else within the declared agreement bound, the example among its top-k).
    answer = responses[2].json()
    assert answer["label"] == labels[str(int(predict([base64.b64decode(example["input"]["data"])]).argmax(1)[0]))]
    if served_selection(server, "resnet18")["precision"] == "fp32":
        assert answer["label"] == example["expect"]["label"]
    else:
        assert example["expect"]["label"] in answer["probabilities"], answer


def test_digits_through_the_image_handler_get_their_true_labels(server: TorchServe, digits_split) -> None:
    _, _, x_test, y_test = digits_split
    model = torch.jit.load(str(BUILD / "digits" / "digits.pt"))  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        offline = model(to_tensor(x_test)).argmax(1).numpy()
    url = server.url("inference") + "/predictions/digits_image"
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda x: post(url, {"data": png_bytes(x)}), x_test))
    assert [r.status_code for r in responses] == [200] * len(x_test)
    served = np.array([int(r.json()["label"]) for r in responses])
    assert (served == offline).mean() == 1.0
    assert (served == y_test).mean() >= 0.95
    assert len(responses[0].json()["probabilities"]) == 3


FUSED = "oneDNNFusionGroup"


def fusion_enabled() -> bool:
    return bool(torch.jit.onednn_fusion_enabled())  # type: ignore[no-untyped-call]


def last_graph() -> str:
    """The graph TorchScript ran last, where fusion groups show."""
    return str(torch.jit.last_executed_optimized_graph())  # type: ignore[attr-defined]


def fuser_forms_groups(dtype: torch.dtype) -> bool:
    """Whether TorchScript's oneDNN Graph fuser forms a group for a tiny conv + ReLU in `dtype` here. Whether it
    does is the CPU's decision (and the ISA caps': ONEDNN_MAX_CPU_ISA=AVX2 or a CPU without AVX-512 gives no bf16
    group, fp32 still fuses), so the tests ask it rather than assume it."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).eval().to(dtype)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = torch.randn(2, 3, 16, 16).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), onednn_fusion(True):
        probe = torch.jit.freeze(torch.jit.trace(model, x))  # type: ignore[no-untyped-call]
        for _ in range(3):  # the fuser rewrites the graph after profiling runs
            probe(x)
        return FUSED in last_graph()


@pytest.fixture(scope="module")
def fusion_dtype() -> tuple[torch.dtype, str | None]:
    """The dtype the fusion tests run in: bf16 where this CPU runs it natively and the fuser fuses it, else fp32;
    and why no group can be expected here (None when the fuser forms groups in that dtype)."""
    native_bf16 = cpu_capabilities(torch.cpu.get_capabilities()).native_bf16
    if native_bf16 and fuser_forms_groups(torch.bfloat16):
        return torch.bfloat16, None
    if fuser_forms_groups(torch.float32):
        return torch.float32, None
    return torch.float32, (f"the oneDNN Graph fuser forms no group for conv + ReLU here (ATen ISA "
                           f"{torch.backends.cpu.get_cpu_capability()}, ONEDNN_MAX_CPU_ISA="
                           f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}, native bf16: {native_bf16})")


def resnet18_and_photos(dtype: torch.dtype) -> tuple[torch.jit.ScriptModule, torch.Tensor]:
    model = compile_for_serving(torch.jit.load(  # type: ignore[no-untyped-call]
        str(BUILD / "resnet18" / "resnet18.pt")), dtype, True)
    preprocess = ImagePreprocessor()
    photos = [preprocess.tensor(jpeg(p)) for p in sample_photos().values()]
    return model, torch.stack(photos * 2).to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("before", [False, True])
def test_onednn_fusion_switch_is_scoped(store: Path, fusion_dtype: tuple[torch.dtype, str | None],
                                        before: bool) -> None:
    """Holds on every CPU: the process-wide switch is on only inside the block and restored after it, also when
    the block raises; with the switch off the graph has no fusion group."""
    model, batch = resnet18_and_photos(fusion_dtype[0])
    original = fusion_enabled()
    torch.jit.enable_onednn_fusion(before)
    try:
        with torch.inference_mode():
            if not before:
                model(batch)
                assert FUSED not in last_graph()
            with onednn_fusion(not before):
                assert fusion_enabled() == (not before)
                model(batch)
            assert fusion_enabled() == before
            with pytest.raises(RuntimeError, match="inside"), onednn_fusion(not before):
                raise RuntimeError("inside")
            assert fusion_enabled() == before
    finally:
        torch.jit.enable_onednn_fusion(original)


def test_onednn_fusion_forms_groups_and_changes_only_rounding(store: Path,
                                                              fusion_dtype: tuple[torch.dtype, str | None]) -> None:
    dtype, no_fusion = fusion_dtype
    if no_fusion:
        pytest.skip(no_fusion)
    model, batch = resnet18_and_photos(dtype)
    before = fusion_enabled()
    with torch.inference_mode():
        plain = model(batch).float()
        assert FUSED not in last_graph()
        with onednn_fusion(True):
            fused = [model(batch).float() for _ in range(3)][-1]  # the fuser rewrites the graph after profiling runs
            assert FUSED in last_graph(), dtype
    assert fusion_enabled() == before
    assert torch.equal(fused.argmax(1), plain.argmax(1))
    assert (torch.softmax(fused, 1) - torch.softmax(plain, 1)).abs().max().item() < 0.02
