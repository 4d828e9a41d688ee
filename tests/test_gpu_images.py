"""The GPU image path (handlers/gpu_images.py): which files the GPU decodes, the CPU fallbacks, per-item
errors inside a batch, orientation, and the batched resize against the CPU path.

torchvision decodes JPEGs on the CPU too, so every step runs here with `device="cpu"` (same decoder as
Pillow: libjpeg-turbo); tests marked `cuda` run nvJPEG and are skipped without a GPU. A short CPU run of
`make bench-gpu`'s script keeps it working."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from ts.context import Context, RequestProcessor

from export.models.resnet import sample_photos
from handlers import gpu_images
from handlers.base import device_overrides
from handlers.errors import InvalidInput, PayloadTooLarge, RequestError, UndecodableInput
from handlers.gpu_images import (
    GpuImages,
    PendingJpeg,
    gpu_refusal,
    orient,
    read_jpeg_header,
    resize_weights,
)
from handlers.image_handler import ImageClassifierHandler
from handlers.images import IMAGENET_STD, ImagePreprocessor
from tests.conftest import built_archive

ROOT = Path(__file__).resolve().parent.parent
LEVEL = 1 / 255 / min(IMAGENET_STD)  # one 8-bit level in normalised units


def cuda(test: Callable[..., None]) -> Callable[..., None]:
    """Skipped without a CUDA device; marked `cuda`, so `pytest -m cuda` (make test-gpu, on a GPU host) selects it."""
    marked: Callable[..., None] = pytest.mark.cuda(
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))
    return marked


def jpeg(image: Image.Image, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def without_segment(data: bytes, marker: int) -> bytes:
    """`data` with every segment of `marker` removed before the first scan (e.g. 0xDB: no quantisation tables)."""
    out, pos = bytearray(data[:2]), 2
    while pos < len(data):
        if data[pos + 1] == 0xDA:
            out += data[pos:]
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if data[pos + 1] != marker:
            out += data[pos:pos + 2 + length]
        pos += 2 + length
    return bytes(out)


def bogus_sampling(data: bytes) -> bytes:
    """A JPEG whose first component claims 0x0 sampling: libjpeg (Pillow, torchvision) refuses it."""
    corrupt = bytearray(data)
    corrupt[corrupt.index(b"\xff\xc0") + 11] = 0x00
    return bytes(corrupt)


@pytest.fixture
def lenient_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let files with bad tables reach the batched decoder (validate sends them to the CPU path otherwise), so
    that a file failing inside the batch is tested."""
    strict = gpu_images.gpu_refusal

    def lenient(header: Any, data: bytes, mode: str) -> str | None:
        reason = strict(header, data, mode)
        return None if reason == "bad_tables" else reason

    monkeypatch.setattr(gpu_images, "gpu_refusal", lenient)


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(image, exif=exif.tobytes(), quality=92)


def photo(name: str = "china.jpg", box: tuple[int, int, int, int] | None = None) -> Image.Image:
    image = Image.fromarray(sample_photos()[name])
    return image.crop(box) if box else image


def assert_matches_cpu(tensor: torch.Tensor, data: bytes, preprocess: ImagePreprocessor, levels: float = 1.0,
                       mean_levels: float | None = None) -> None:
    expected = preprocess.tensor(data)
    difference = (tensor.float().cpu() - expected).abs()
    assert float(difference.max()) <= levels * LEVEL + 1e-4, float(difference.max()) / LEVEL
    if mean_levels is not None:
        assert float(difference.mean()) <= mean_levels * LEVEL, float(difference.mean()) / LEVEL


# ---- the header and the choice of decoder --------------------------------------------------------

def test_header_fields_and_which_files_the_gpu_takes() -> None:
    image = photo(box=(0, 0, 300, 200))
    plain = jpeg(image)
    header = read_jpeg_header(plain)
    assert header is not None and (header.width, header.height, header.components, header.sof) == (300, 200, 3, 0xC0)
    assert gpu_refusal(header, plain, "RGB") is None
    grey = jpeg(image.convert("L"))
    assert gpu_refusal(read_jpeg_header(grey), grey, "RGB") is None
    rotated = read_jpeg_header(with_orientation(image, 6))
    assert rotated is not None and rotated.orientation == 6 and rotated.oriented_size == (200, 300)
    refused = {
        "not_jpeg": png(image),
        "progressive": jpeg(image, progressive=True),
        "cmyk": jpeg(image.convert("CMYK")),
        "truncated": plain[: len(plain) // 2],
        "unreadable_header": plain[:100],  # cut inside the quantisation tables
        "orientation": jpeg(image, xmp=b"<x:xmpmeta><tiff:Orientation>3</tiff:Orientation></x:xmpmeta>"),
        "bad_tables": bogus_sampling(plain),
    }
    for reason, data in refused.items():
        assert gpu_refusal(read_jpeg_header(data), data, "RGB") == reason, reason
    broken_exif = plain[:2] + b"\xff\xe1\x00\x0eExif\x00\x00XX\x00\x00\x00\x00" + plain[2:]
    assert gpu_refusal(read_jpeg_header(broken_exif), broken_exif, "RGB") == "orientation"
    # Tables libjpeg refuses and nvJPEG might decode into garbage: undefined quantisation or Huffman tables.
    no_quantisation = without_segment(plain, 0xDB)
    undefined_huffman = bytearray(plain)
    undefined_huffman[undefined_huffman.index(b"\xff\xda") + 6] = 0x33
    for data in (no_quantisation, bytes(undefined_huffman), without_segment(plain, 0xC4)):
        assert gpu_refusal(read_jpeg_header(data), data, "RGB") == "bad_tables"


def test_validate_checks_the_header_and_decodes_other_formats_on_the_cpu() -> None:
    preprocess = ImagePreprocessor(max_pixels=1_000_000)
    gpu = GpuImages(preprocess, "cpu")
    image = photo(box=(0, 0, 320, 240))
    assert isinstance(gpu.validate(jpeg(image)), PendingJpeg)
    pixels = gpu.validate(png(image))
    assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8
    assert torch.equal(pixels, preprocess.pixels(png(image)))
    # Limits come from the header, before any decoding: the frame claims 2000x1000 pixels.
    header = bytearray(jpeg(image))
    sof = header.index(b"\xff\xc0")
    header[sof + 5:sof + 9] = (1000).to_bytes(2, "big") + (2000).to_bytes(2, "big")
    with pytest.raises(PayloadTooLarge):
        gpu.validate(bytes(header))
    header[sof + 5:sof + 9] = (10).to_bytes(2, "big") + (20000).to_bytes(2, "big")
    with pytest.raises(InvalidInput):
        gpu.validate(bytes(header))
    with pytest.raises(UndecodableInput):
        gpu.validate(b"not an image at all")
    assert gpu.counts["gpu"] == 1 and gpu.counts["cpu:not_jpeg"] == 2


# ---- resize weights and orientation --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bilinear", "bicubic"])
@pytest.mark.parametrize(("size_in", "size_out"), [(640, 383), (427, 256), (100, 256), (256, 256), (1000, 37)])
def test_resize_weights_are_torchs_antialiased_interpolation(kind: str, size_in: int, size_out: int) -> None:
    signal = torch.rand(1, 1, 1, size_in, dtype=torch.float64)
    expected = F.interpolate(signal, size=(1, size_out), mode=kind, antialias=True, align_corners=False)[0, 0, 0]
    weights = torch.tensor(resize_weights(kind, size_in, size_out, 0, size_out))
    torch.testing.assert_close(weights @ signal[0, 0, 0], expected, rtol=0, atol=1e-9)
    rows = torch.tensor(resize_weights(kind, size_in, size_out, size_out // 3, size_out // 2))
    torch.testing.assert_close(rows, weights[size_out // 3:size_out // 3 + size_out // 2])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_pillows_exif_transpose(orientation: int) -> None:
    from PIL import ImageOps

    image = Image.fromarray(np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    image.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(image))
    got = orient(torch.from_numpy(np.array(image)).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape and (got == expected).all()


# ---- batches ---------------------------------------------------------------------------------------

def mixed_batch() -> dict[str, bytes]:
    china, flower = photo("china.jpg"), photo("flower.jpg")
    return {
        "photo": jpeg(china, quality=90),
        "crop": jpeg(flower.crop((13, 0, 600, 390)), quality=80),
        "small-upscaled": jpeg(flower.crop((100, 100, 260, 220))),
        "grey": jpeg(china.convert("L").crop((0, 0, 500, 427))),
        "png": png(flower.crop((0, 0, 400, 300))),
        "progressive": jpeg(china.crop((0, 0, 512, 400)), progressive=True),
        **{f"exif{o}": with_orientation(china.crop((40, 0, 600, 380)), o) for o in (3, 6, 8)},
        "corrupt": bogus_sampling(jpeg(flower)),
    }


def test_a_batch_decodes_at_once_and_a_corrupt_item_fails_alone(lenient_header: None) -> None:
    preprocess = ImagePreprocessor()
    gpu = GpuImages(preprocess, "cpu")
    bodies = mixed_batch()
    items = [gpu.validate(data) for data in bodies.values()]
    assert [type(i).__name__ for i in items].count("PendingJpeg") == 8  # png and progressive: CPU
    ready = dict(zip(bodies, gpu.decode_batch(items), strict=True))
    assert isinstance(ready.pop("corrupt"), UndecodableInput)
    assert gpu.counts["cpu:refused_by_decoder"] == 1
    for name, tensor in ready.items():
        assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32, name
        assert_matches_cpu(tensor, bodies[name], preprocess, mean_levels=0.05)
    with pytest.raises(UndecodableInput):
        gpu.collate(items)
    good = [i for i, name in zip(items, bodies, strict=True) if name != "corrupt"]
    batch = gpu.collate(good, torch.float16, channels_last=True)
    assert batch.shape == (9, 3, 224, 224) and batch.dtype == torch.float16
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_what_the_batched_decoder_refuses_goes_through_the_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvJPEG refusing a file that Pillow reads (an odd subsampling, say): that image is decoded on the CPU."""
    # draft off: the CPU path would decode at 1/4 scale in the DCT domain, which nvJPEG cannot
    preprocess = ImagePreprocessor(mode="L", resize=64, crop=None, mean=(0.5,), std=(0.25,), draft=False)
    gpu = GpuImages(preprocess, "cpu", max_batch_pixels=400_000)  # forces two decoder calls for three photos
    bodies = [jpeg(photo("china.jpg")), jpeg(photo("flower.jpg")), jpeg(photo("china.jpg", (0, 0, 300, 427)))]
    refused = bodies[1]
    decode = GpuImages._decode

    def picky(self: GpuImages, data: list[torch.Tensor]) -> list[torch.Tensor]:
        if any(bytes(t.numpy()) == refused for t in data):
            raise RuntimeError("nvjpeg: unsupported")
        return decode(self, data)

    monkeypatch.setattr(GpuImages, "_decode", picky)
    ready = gpu.decode_batch([gpu.validate(b) for b in bodies])
    assert gpu.counts["cpu:refused_by_decoder"] == 1
    for tensor, data in zip(ready, bodies, strict=True):
        assert tensor.shape == (1, 64, 64)
        assert_matches_cpu(tensor, data, preprocess)


def test_gpu_section_applies_on_cuda_only() -> None:
    config = yaml.safe_load((ROOT / "config" / "models" / "resnet50.yaml").read_text())
    assert device_overrides(config, torch.device("cpu")) == {}
    overrides = device_overrides(config, torch.device("cuda", 0))
    assert overrides["precision"] == "fp16" and overrides["channels_last"] is True
    from tsforge.packaging.archive import model_config

    text, changed = model_config(ROOT / "config" / "models" / "resnet50.yaml", "gpu")
    packaged = yaml.safe_load(text)
    assert changed["batchSize"] == packaged["batchSize"] == config["gpu"]["batchSize"]
    assert packaged["handler"] == config["handler"] and packaged["gpu"] == config["gpu"]
    assert model_config(ROOT / "config" / "models" / "resnet50.yaml", "cpu") == (
        (ROOT / "config" / "models" / "resnet50.yaml").read_text(), {})


# ---- through the handler: a bad item in a batch gets its own 4xx ------------------------------------

@pytest.fixture(scope="module")
def small_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits CNN behind the image handler (grey, 8x8, bilinear: a resize the GPU path computes)."""
    from tsforge.packaging import archive

    if not (ROOT / "build" / "digits" / "export.json").is_file():
        subprocess.run(["make", "-s", "build/digits/export.json", "MODELS=digits"], cwd=ROOT, check=True)
    folder = tmp_path_factory.mktemp("gpu_images")
    config = yaml.safe_load((ROOT / "config" / "models" / "digits_image.yaml").read_text())
    config["handler"].update(resample="bilinear", backend="torchscript", precision="fp32", draft=False)
    config_file = folder / "digits_gpu.yaml"
    config_file.write_text(yaml.safe_dump(config))
    plan = archive.plan("digits", store=folder, config_file=config_file, model_name="digits_gpu",
                        handler="handlers/image_handler.py", device="cpu")
    mar = archive.build(plan)
    model_dir = folder / "unpacked"
    with zipfile.ZipFile(mar) as packed:
        packed.extractall(model_dir)
    return model_dir


def context_for(model_dir: Path, batch: int, device: str) -> Context:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    context = Context("digits_gpu", str(model_dir), manifest, batch, 0 if device == "cuda" else None, "0.12.0",
                      model_yaml_config=config)
    context.request_processor = [RequestProcessor({}) for _ in range(batch)]
    return context


def handler_on(model_dir: Path, device: str, gpu_path: bool) -> ImageClassifierHandler:
    handler = ImageClassifierHandler()
    handler.initialize(context_for(model_dir, 1, device))
    if gpu_path and device == "cpu":  # the GPU path's code, run on the CPU
        handler.gpu_images = GpuImages(handler.preprocess, "cpu")
    return handler


def rows_for(bodies: list[Any]) -> list[dict[str, Any]]:
    return [{"body": bytearray(b)} if isinstance(b, bytes) else {"body": b} for b in bodies]


def answers(handler: ImageClassifierHandler, bodies: list[Any]) -> list[tuple[int, Any]]:
    context = context_for(handler.model_dir, len(bodies), handler.device.type)
    out = handler.handle(rows_for(bodies), context)
    return [(int(context.get_response_status(i)[0]), json.loads(b)) for i, b in enumerate(out)]


def check_batch_isolation(model_dir: Path, device: str) -> None:
    bodies = mixed_batch()
    corrupt = bodies["corrupt"]
    instances = [{"b64": base64.b64encode(bodies["photo"]).decode()}, {"b64": base64.b64encode(corrupt).decode()}]
    batch: list[Any] = [*bodies.values(), b"hello", {"instances": instances}]
    gpu_path = handler_on(model_dir, device, gpu_path=True)
    assert gpu_path.gpu_images is not None
    cpu_path = handler_on(model_dir, "cpu", gpu_path=False)
    got, expected = answers(gpu_path, batch), answers(cpu_path, batch)
    assert [s for s, _ in got] == [s for s, _ in expected] == [200] * 9 + [400, 400, 400]
    assert got[-1][1]["message"].startswith("item 1: ")
    for (_, answer), (_, reference) in zip(got[:9], expected[:9], strict=True):
        assert answer["label"] == reference["label"]
        for label, probability in reference["probabilities"].items():
            assert abs(answer["probabilities"].get(label, 0.0) - probability) < 0.02


def test_the_handler_answers_a_mixed_batch_and_isolates_the_bad_items(small_archive: Path,
                                                                     lenient_header: None) -> None:
    check_batch_isolation(small_archive, "cpu")


def test_a_corrupt_header_is_answered_before_the_batch(small_archive: Path) -> None:
    handler = handler_on(small_archive, "cpu", gpu_path=True)
    (status, body), = answers(handler, [mixed_batch()["corrupt"]])
    assert status == 400 and body["type"] == "undecodable_input"
    assert handler.gpu_images is not None and handler.gpu_images.counts["cpu:bad_tables"] == 1


# ---- on a CUDA device ---------------------------------------------------------------------------------

@cuda
def test_nvjpeg_batch_matches_the_cpu_path_within_the_stated_bound() -> None:
    """nvJPEG differs from libjpeg-turbo (IDCT, chroma upsampling): within a few levels, on average under one."""
    preprocess = ImagePreprocessor()
    gpu = GpuImages(preprocess, "cuda")
    bodies = mixed_batch()
    del bodies["corrupt"]
    ready = gpu.decode_batch([gpu.validate(d) for d in bodies.values()], torch.float16)
    for tensor, (name, data) in zip(ready, bodies.items(), strict=True):
        assert tensor.is_cuda and tensor.dtype == torch.float16, name
        assert_matches_cpu(tensor, data, preprocess, levels=48.0, mean_levels=1.5)


@cuda
def test_nvjpeg_isolates_a_corrupt_item_in_a_batch(lenient_header: None) -> None:
    gpu = GpuImages(ImagePreprocessor(), "cuda")
    bodies = mixed_batch()
    ready = gpu.decode_batch([gpu.validate(d) for d in bodies.values()])
    assert isinstance(ready[-1], RequestError)
    assert all(isinstance(t, torch.Tensor) and t.is_cuda for t in ready[:-1])


@cuda
def test_the_handler_on_cuda_isolates_bad_items(small_archive: Path, lenient_header: None) -> None:
    check_batch_isolation(small_archive, "cuda")


# ---- the bench script ----------------------------------------------------------------------------

@pytest.mark.integration
def test_gpu_bench_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    """`make bench-gpu`'s script on a tiny model: export reuse, archive, references, ceilings, a served level
    with client processes, the report. GPU sampling is empty here."""
    from loadtest import gpu_bench

    subprocess.run(["make", "-s", "build/digits/export.json", "MODELS=digits"], cwd=ROOT, check=True)
    shutil.copytree(ROOT / "build" / "digits", tmp_path / "build" / "digits",
                    ignore=shutil.ignore_patterns("stage*", "mar*"))
    out = tmp_path / "report"
    code = gpu_bench.main(["--model", "digits", "--model-name", "digits_image",
                           "--handler", "handlers/image_handler.py",
                           "--config", str(ROOT / "config" / "models" / "digits_image.yaml"), "--targets",
                           "tsforge,ceiling", "--levels", "2", "--duration", "2", "--warmup", "1", "--clients", "2",
                           "--payload-count", "4", "--ceiling-duration", "0.3", "--build-dir", str(tmp_path / "build"),
                           "--out", str(out)])
    assert code == 0
    result = json.loads((out / "gpu-bench.json").read_text())
    row = result["rows"][0]
    assert row["target"] == "tsforge" and row["level"] == 2 and row["requests"] > 0
    assert row["success_rate"] == 1.0 and row["client"]["processes"] == 2
    assert result["ceiling"]["model_b256_items_per_s"] > 0
    assert (out / "gpu-bench.png").is_file() and "| tsforge, as archived (" in (out / "gpu-bench.md").read_text()
    data = json.loads((out / "gpu-digits_image.json").read_text())  # what docs/data keeps: the GPU page's shape
    assert data["schema"] == "tsforge.gpu-bench/1" and data["rows"][0]["level"] == 2 and data["machine"]["torch"]


@pytest.mark.slow  # builds the minilm archive
def test_gpu_bench_serves_a_prebuilt_text_archive(tmp_path: Path) -> None:
    """The sentence-embedding path of the bench (`--mar`: an archive built elsewhere): sentence payloads with
    reference answers, the ceiling, and the stock handler skipped with the reason (TorchServe has none)."""
    from loadtest import gpu_bench

    out = tmp_path / "report"
    code = gpu_bench.main(["--model", "minilm", "--mar", str(built_archive("minilm")), "--targets", "ceiling,stock",
                           "--payload-count", "4", "--ceiling-duration", "0.2", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "gpu-bench.json").read_text())
    assert result["payloads"]["count"] == 4 and result["setup"]["prebuilt"] == "minilm.mar"
    assert result["ceiling"]["handler_items_per_s"] > 0 and result["rows"] == []
    assert any("no stock handler" in note for note in result["setup"]["notes"])


@cuda
def test_on_cuda_the_frozen_program_is_optimized_for_inference() -> None:
    """conv + add + ReLU fused into cuDNN calls on CUDA (docs/benchmarks.md: 1.6x at batch 32 on an H200)."""
    from handlers.runtimes import compile_for_serving

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval().cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.inference_mode():
        expected = block(x)
    traced = torch.jit.trace(block, (x,))  # type: ignore[no-untyped-call]
    # converting to fp16 converts the parameters the traced program shares with `block`: the reference comes first
    served = compile_for_serving(traced, torch.float16, True, torch.device("cuda"))
    with torch.inference_mode():
        torch.testing.assert_close(served(x.half().contiguous(memory_format=torch.channels_last)).float(), expected,
                                   rtol=1e-2, atol=1e-2)
    assert "aten::batch_norm" not in str(served.graph)
