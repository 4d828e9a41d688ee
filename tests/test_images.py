"""Image decoding without a server (the handler in-process with TorchServe's Context): every format, pixel
mode and orientation, through every encoding a client may use, against an independent reference (numpy +
torchvision transforms); hostile input."""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import transforms
from ts.context import Context, RequestProcessor

from export.models.resnet import sample_photos
from handlers.errors import InvalidInput, PayloadTooLarge, RequestError, UndecodableInput
from handlers.image_handler import ImageClassifierHandler
from handlers.images import IMAGENET_MEAN, IMAGENET_STD, TORCH_RESAMPLING, ImagePreprocessor, open_image, to_mode
from tests.conftest import built_archive

PREPROCESS = ImagePreprocessor()
REFERENCE = transforms.Compose([
    transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
])
LEVEL = 1 / 255 / min(IMAGENET_STD)  # one 8-bit grey level in normalised units
# torch's antialiased uint8 resize (handlers/images.py) lands within one 8-bit level of Pillow's, which the
# torchvision reference uses; the rounding of the two differs in a few pixels of a thousand.
RESIZED = LEVEL + 1e-5


def save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    """What a plain decoder makes of a lossy file: the truth for JPEG-based variants."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[:, :, None] / 255.0
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def with_orientation(image: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(Image.fromarray(image), "JPEG", quality=95, exif=exif)


# Stored pixels for each EXIF orientation, and the numpy operation that turns the decoded file upright.
ORIENTATIONS: dict[int, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    2: (np.fliplr, np.fliplr),
    3: (lambda a: np.rot90(a, 2), lambda a: np.rot90(a, 2)),
    6: (lambda a: np.rot90(a, 1), lambda a: np.rot90(a, -1)),
    8: (lambda a: np.rot90(a, -1), lambda a: np.rot90(a, 1)),
}


@cache
def variants() -> dict[str, tuple[bytes, np.ndarray, float]]:
    """name -> (file bytes, the upright RGB picture it shows, allowed max |diff| in normalised units)."""
    out: dict[str, tuple[bytes, np.ndarray, float]] = {}
    for photo_name, photo in sample_photos().items():
        stem = photo_name.split(".")[0]
        rgb = Image.fromarray(photo)
        grey = np.asarray(rgb.convert("L"))
        height, width = grey.shape
        alpha = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
        quantised = rgb.quantize(256)
        second_frame = Image.fromarray(255 - photo).quantize(256)
        jpeg = save(rgb, "JPEG", quality=95)
        cases = {
            "jpeg": (jpeg, decoded(jpeg), RESIZED),
            "png": (save(rgb, "PNG"), photo, RESIZED),
            "webp": (save(rgb, "WEBP", lossless=True), photo, RESIZED),
            "tiff": (save(rgb, "TIFF", compression="tiff_deflate"), photo, RESIZED),
            "bmp": (save(rgb, "BMP"), photo, RESIZED),
            "gif-first-frame": (save(quantised, "GIF", save_all=True, append_images=[second_frame]),
                                np.asarray(quantised.convert("RGB")), RESIZED),
            "png-palette": (save(quantised, "PNG"), np.asarray(quantised.convert("RGB")), RESIZED),
            "png-grey16": (save(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"), grey3(grey), RESIZED),
            "png-grey": (save(Image.fromarray(grey), "PNG"), grey3(grey), RESIZED),
            "tiff-cmyk": (save(rgb.convert("CMYK"), "TIFF"), photo, RESIZED),
            "jpeg-cmyk": (save(rgb.convert("CMYK"), "JPEG", quality=95), photo, 40 * LEVEL),
            "png-la": (save(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"),
                       grey3(over_white(grey3(grey), alpha)[:, :, 0]), 3 * LEVEL),
            "png-rgba": (save(Image.fromarray(np.dstack([photo, alpha]), "RGBA"), "PNG"),
                         over_white(photo, alpha), 3 * LEVEL),
            "webp-rgba": (save(Image.fromarray(np.dstack([photo, alpha]), "RGBA"), "WEBP", lossless=True),
                          over_white(photo, alpha), 3 * LEVEL),
        }
        for orientation, (store, upright) in ORIENTATIONS.items():
            data = with_orientation(np.ascontiguousarray(store(photo)), orientation)
            cases[f"jpeg-exif{orientation}"] = (data, np.ascontiguousarray(upright(decoded(data))), RESIZED)
        out.update({f"{stem}-{kind}": case for kind, case in cases.items()})
    return out


def reference(picture: np.ndarray) -> torch.Tensor:
    tensor: torch.Tensor = REFERENCE(Image.fromarray(picture))
    return tensor


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Each wrapper builds the request row TorchServe hands the handler for one way of sending the file.
WRAPPERS: dict[str, Callable[[bytes], dict[str, Any]]] = {
    "raw-body": lambda d: {"body": bytearray(d)},
    "base64": lambda d: {"body": b64(d)},
    "base64-urlsafe": lambda d: {"body": base64.urlsafe_b64encode(d).decode()},
    "base64-unpadded": lambda d: {"body": b64(d).rstrip("=")},
    "base64-newlines-binary-body": lambda d: {"body": base64.encodebytes(d)},
    "data-uri": lambda d: {"body": "data:image/x;base64," + b64(d)},
    "data-uri-binary-body": lambda d: {"body": ("data:image/x;base64," + b64(d)).encode()},
    "json-data": lambda d: {"body": {"data": b64(d)}},
    "json-as-octet-stream": lambda d: {"body": json.dumps({"b64": b64(d)}).encode()},
    "kserve-instances": lambda d: {"body": {"instances": [{"data": b64(d)}, b64(d)]}},
    "multipart-field": lambda d: {"file": bytearray(d)},
}


class BatchRecorder:
    """Stands in for the model's forward pass: keeps each collated batch, answers zero logits."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.batches.append(batch.clone())
        return torch.zeros(len(batch), 1000)


def make_context(model_dir: Path, config: dict[str, Any], batch: int) -> Context:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    context = Context("resnet18", str(model_dir), manifest, batch, None, "0.12.0", model_yaml_config=config)
    context.request_processor = [RequestProcessor({}) for _ in range(batch)]
    return context


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageClassifierHandler, BatchRecorder]:
    """The resnet18 archive's handler, kept in fp32 (so decoded tensors reach the model unrounded), with the
    forward pass replaced by a recorder: requests go through the public `handle` exactly as TorchServe sends them."""
    model_dir = tmp_path_factory.mktemp("resnet18_mar")
    with zipfile.ZipFile(built_archive("resnet18")) as mar:
        mar.extractall(model_dir)
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    config["handler"].update(precision="fp32", channels_last=False)
    config["batchSize"] = 1
    handler = ImageClassifierHandler()
    handler.initialize(make_context(model_dir, config, 1))
    recorder = BatchRecorder()
    handler.infer = recorder  # type: ignore[method-assign]
    handler.test_config = config  # type: ignore[attr-defined]
    return handler, recorder


def handle_one(decoder, row: dict[str, Any]) -> tuple[int, Any]:
    handler, _ = decoder
    context = make_context(handler.model_dir, handler.test_config, 1)
    body = json.loads(handler.handle([row], context)[0])
    return context.get_response_status(0)[0], body


def decode_row(decoder, row: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors the model receives for one request row."""
    status, body = handle_one(decoder, row)
    assert status == 200, body
    return list(decoder[1].batches[-1].unbind(0))


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("variant", list(variants()))
def test_every_format_and_encoding_decodes_to_the_reference(decoder, variant: str, wrapper: str) -> None:
    data, picture, tolerance = variants()[variant]
    expected = reference(picture)
    tensors = decode_row(decoder, WRAPPERS[wrapper](data))
    assert len(tensors) == (2 if wrapper == "kserve-instances" else 1)
    for tensor in tensors:
        assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
        assert (tensor - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_exif_orientation_is_applied(orientation: int) -> None:
    photo = sample_photos()["china.jpg"]
    data, picture, _ = variants()[f"china-jpeg-exif{orientation}"]
    upright = to_mode(open_image(data), "RGB")
    assert upright.size == (photo.shape[1], photo.shape[0])
    as_stored = reference(decoded(data))  # the pixels as stored, tag ignored
    if orientation in (6, 8):  # stored sideways: the stored picture does not even have the photo's shape
        assert Image.open(io.BytesIO(data)).size == (photo.shape[0], photo.shape[1])
    assert (PREPROCESS(data) - reference(picture)).abs().max().item() <= RESIZED
    assert (PREPROCESS(data) - as_stored).abs().mean().item() > 0.1  # ignoring the tag would be visible


def test_big_jpegs_decode_in_the_dct_domain_close_to_a_full_decode() -> None:
    photo = Image.fromarray(sample_photos()["flower.jpg"]).resize((2560, 1708), Image.Resampling.BICUBIC)
    data = save(photo, "JPEG", quality=92)
    assert open_image(data, draft=("RGB", (256, 256))).size == (640, 427)  # decoded at 1/4 scale
    fast, full = PREPROCESS(data), ImagePreprocessor(draft=False)(data)
    assert (fast - full).abs().mean().item() < 4 * LEVEL
    assert (full - reference(decoded(data))).abs().max().item() <= RESIZED


def test_grey_mode_with_identity_normalisation_is_pixels_over_255() -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    digits_like = ImagePreprocessor(mode="L", resize=8, crop=None, mean=(0.0,), std=(1.0,), resample="box")
    tensor = digits_like(save(Image.fromarray(grey), "PNG"))
    assert torch.equal(tensor, torch.from_numpy(grey).float().div(255.0).unsqueeze(0))
    rgb = digits_like(save(Image.fromarray(grey3(grey)), "PNG"))
    assert torch.equal(rgb, tensor)


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height over a tiny image: decoding it would allocate the full size."""
    data = bytearray(save(Image.new("L", (8, 8)), "PNG"))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


@pytest.mark.parametrize("size", [(20_000, 20_000), (9_000, 5_000), (100_000, 500)])
def test_decompression_bombs_are_refused_with_413_before_decoding(size: tuple[int, int]) -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        PREPROCESS(bomb_png(*size))
    assert caught.value.status == 413 and "pixels" in caught.value.message


def test_a_real_highly_compressible_bomb_is_refused() -> None:
    data = save(Image.new("L", (8_000, 6_000)), "PNG", optimize=True)
    assert len(data) < 200_000
    with pytest.raises(PayloadTooLarge):
        PREPROCESS(data)
    with pytest.raises(PayloadTooLarge):
        ImagePreprocessor(max_pixels=1_000_000)(save(Image.new("RGB", (1_200, 900)), "PNG"))


def test_extreme_aspect_ratio_is_invalid_not_a_memory_blowup() -> None:
    with pytest.raises(InvalidInput, match="aspect ratio"):
        PREPROCESS(save(Image.new("RGB", (1, 30_000)), "PNG"))


@pytest.mark.parametrize(("payload", "kind"), [
    (b"", UndecodableInput),
    (b"GIF89a" + b"\x00" * 20, UndecodableInput),
    (b"%PDF-1.4 not an image", UndecodableInput),
    ({"pixels": [1, 2, 3]}, UndecodableInput),
    ([[0.1, 0.2]], UndecodableInput),
    ("data:image/png,notbase64", UndecodableInput),
])
def test_bad_payloads_raise_documented_request_errors(payload: Any, kind: type[RequestError]) -> None:
    with pytest.raises(kind):
        PREPROCESS(payload)


@pytest.mark.parametrize("bad", [{"mode": "CMYK"}, {"mode": "L"}, {"crop": 300}, {"std": [0, 1, 1]},
                                 {"resample": "cubic-ish"}])
def test_bad_handler_settings_fail_at_load_with_a_clear_message(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ImagePreprocessor.from_config(bad)


# ---- hostile input: only documented 4xx errors, never another exception -------------------------

def only_request_errors(call: Callable[[], torch.Tensor]) -> None:
    try:
        tensor = call()
    except RequestError as exc:
        assert exc.status in (400, 413, 422) and exc.message
    else:
        assert tensor.shape == (3, 224, 224) and torch.isfinite(tensor).all()


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_only_raise_request_errors(data: bytes) -> None:
    only_request_errors(lambda: PREPROCESS(data))


@FUZZ
@given(st.text(max_size=2048))
def test_random_text_only_raises_request_errors(text: str) -> None:
    only_request_errors(lambda: PREPROCESS(text))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=64),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["data", "b64", "instances", "inputs", "x"]) | st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(JSON_VALUES)
def test_random_json_rows_get_a_4xx_or_an_answer_never_a_500(decoder, value: Any) -> None:
    status, body = handle_one(decoder, {"body": value})
    assert status in (200, 400, 413, 422), body
    assert status == 200 or (body["code"] == status and body["message"])


@cache
def small_files() -> list[bytes]:
    photo = Image.fromarray(sample_photos()["flower.jpg"]).resize((48, 32))
    return [save(photo, "JPEG"), save(photo, "PNG"), save(photo.quantize(16), "GIF"), save(photo, "TIFF"),
            save(photo, "WEBP"), save(photo, "BMP"), save(photo.convert("CMYK"), "JPEG"),
            save(photo.convert("CMYK"), "TIFF", compression="tiff_lzw"), save(photo.convert("LA"), "PNG")]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt files
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupted_real_images_only_raise_request_errors(data: st.DataObject) -> None:
    original = data.draw(st.sampled_from(small_files()))
    corrupted = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(corrupted) - 1))
        corrupted[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(16, len(corrupted)))
    only_request_errors(lambda: PREPROCESS(bytes(corrupted[:cut])))


@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "lanczos", "box"])
def test_every_resampling_filter_matches_torchvision_on_pillow(resample: str) -> None:
    photo = Image.fromarray(sample_photos()["china.jpg"])
    reference_for = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode[resample.upper()]),
        transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    difference = (ImagePreprocessor(resample=resample)(save(photo, "PNG")) - reference_for(photo)).abs()
    if resample in TORCH_RESAMPLING:
        assert difference.max().item() <= RESIZED and difference.mean().item() < 0.01 * LEVEL
    else:  # Pillow resizes these itself: the same pixels as torchvision's
        assert difference.max().item() <= 1e-5
