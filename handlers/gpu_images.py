"""Image preprocessing on a CUDA device: the JPEGs of a whole batch decoded in one nvJPEG call, then resized,
cropped and normalised on the GPU; everything else through the CPU path of `handlers.images`, per item.

Per request, on the CPU, `GpuImages.validate` reads only the JPEG header (markers up to the frame header:
size, components, coding, EXIF orientation) and enforces `max_pixels` and the aspect-ratio limit before any
decoding. A baseline 8-bit YCbCr/grey JPEG with an intact end marker becomes a `PendingJpeg`; anything else
(PNG, WebP..., progressive, arithmetic-coded, 12-bit, CMYK/RGB-coded JPEGs, unreadable EXIF/XMP orientation,
a missing end marker) is decoded right there by `ImagePreprocessor.pixels`, exactly as the CPU handler does
(a corrupt file gets its own 4xx there).

Per batch, `GpuImages.decode_batch` decodes every pending JPEG with one
`torchvision.io.decode_jpeg(list, device="cuda")` call (nvJPEG; the hardware JPEG engines on A100/H100/H200).
That call returns nothing when any image fails, so a failed call is retried image by image, and an image
nvJPEG refuses goes through the CPU path: a file that neither decodes gets that request's own 4xx (as a
`RequestError` in the returned list) while the rest of the batch is answered.

EXIF orientation is applied on the GPU (flips and transposes). Resize and centre crop are one pair of
batched matrix products per group of similar sizes: the antialiased bilinear/bicubic filter weights that
torch's `interpolate(antialias=True)` uses (the CPU path's resize), restricted to the rows and columns the
crop keeps, applied horizontally then vertically with the 8-bit rounding in between that the CPU path's
uint8 kernel does. Normalisation happens in fp32 and the result is cast to the model's dtype, in
channels-last layout when asked. CPU-decoded pixels travel through pinned memory.

Parity with the CPU path (tests/test_gpu_images.py): with the same decoder (torchvision's CPU decoder in the
tests) the resize and crop land within one 8-bit level of `ImagePreprocessor.pixels`; nvJPEG's IDCT and
chroma upsampling differ from libjpeg-turbo's by a few levels (measured on the sample photos: mean absolute
difference under 1 level, see the CUDA test), and class probabilities move by well under 0.01. A JPEG at
least twice the target size on both sides is an exception: the CPU path (`draft`) decodes it at 1/2 to 1/8
scale in the DCT domain, which nvJPEG does not do, so the GPU path decodes it whole and the antialiased
filter does all the downscaling (a different, equally smooth result; more decoding work for big photos).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from handlers.errors import PayloadTooLarge, RequestError, UndecodableInput
from handlers.images import ImagePreprocessor

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
#: frame headers: baseline and extended sequential Huffman (what nvJPEG's batched decoder takes)
SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)
#: every start-of-frame marker (C4 DHT, C8 JPG and CC DAC are not frames)
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])
EXIF_ORIENTATION_TAG = 0x0112
XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
#: filters whose antialiased weights are computed here exactly as torch computes them
GPU_RESAMPLING = {"bilinear": 2, "bicubic": 4}
#: decoded pixels per nvJPEG call (and per resize group): bounds the GPU memory one batch takes
DEFAULT_MAX_BATCH_PIXELS = 256 * 1024 * 1024
#: images whose height and width fall in the same bucket of this many pixels are resized together
SIZE_BUCKET = 64


@dataclass(frozen=True)
class JpegHeader:
    """What the markers before the first scan say about a JPEG file."""

    sof: int  # start-of-frame marker (0xC0 baseline, 0xC2 progressive, ...)
    precision: int  # bits per sample
    width: int  # as stored, before EXIF orientation
    height: int
    component_ids: tuple[int, ...]
    adobe_transform: int | None  # APP14 "Adobe" colour transform: 0 none (RGB/CMYK), 1 YCbCr, 2 YCCK
    orientation: int | None  # EXIF orientation (1 when the file has none); None when it cannot be read
    xmp: bool  # an XMP packet is present (Pillow reads an orientation from it when EXIF has none)
    tables_ok: bool = True  # sampling factors valid, every quantisation and Huffman table used is defined

    @property
    def components(self) -> int:
        return len(self.component_ids)

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) after EXIF orientation: 5 to 8 swap the sides."""
        if self.orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height


def _u16(data: bytes, at: int, little: bool = False) -> int:
    return int.from_bytes(data[at:at + 2], "little" if little else "big")


def _u32(data: bytes, at: int, little: bool = False) -> int:
    return int.from_bytes(data[at:at + 4], "little" if little else "big")


def exif_orientation(data: bytes, start: int, end: int) -> int | None:
    """The Orientation tag of the TIFF structure in data[start:end] (IFD0); 1 when absent, None when malformed."""
    if end - start < 8:
        return None
    order = data[start:start + 2]
    if order not in (b"II", b"MM"):
        return None
    little = order == b"II"
    if _u16(data, start + 2, little) != 42:
        return None
    ifd = start + _u32(data, start + 4, little)
    if ifd + 2 > end:
        return None
    count = _u16(data, ifd, little)
    if ifd + 2 + 12 * count > end:
        return None
    for n in range(count):
        entry = ifd + 2 + 12 * n
        if _u16(data, entry, little) == EXIF_ORIENTATION_TAG:
            if _u16(data, entry + 2, little) != 3:  # SHORT
                return None
            return _u16(data, entry + 8, little)
    return 1


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """Parse the markers up to the first scan; None when `data` is not a JPEG or its header is unreadable.

    Besides the frame header, it checks what libjpeg refuses and nvJPEG may decode into garbage instead:
    sampling factors outside 1-4, a quantisation table or a Huffman table used but never defined."""
    if not data.startswith(JPEG_MAGIC):
        return None
    size = len(data)
    pos = 2
    orientation: int | None = 1
    exif_segments = 0
    adobe: int | None = None
    xmp = False
    frame: JpegHeader | None = None
    quantisation: set[int] = set()
    huffman: set[tuple[int, int]] = set()  # (class 0 DC / 1 AC, id)
    used_quantisation: set[int] = set()
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9):  # a second SOI, or the end before any scan
            return None
        length = _u16(data, pos + 2)
        body, end = pos + 4, pos + 2 + length
        if length < 2 or end > size:
            return None
        if marker == 0xDA:  # the first scan: the header is complete
            if frame is None or length < 6 + 2 * data[body]:
                return None
            scan = [data[body + 2 + 2 * k] for k in range(data[body])]
            used_huffman = {(0, t >> 4) for t in scan} | {(1, t & 0x0F) for t in scan}
            # no Huffman table at all (motion-JPEG frames): libjpeg supplies the standard ones; the CPU decodes it
            defined = used_huffman <= huffman and used_quantisation <= quantisation
            return dataclasses.replace(frame, adobe_transform=adobe, orientation=orientation, xmp=xmp,
                                       tables_ok=frame.tables_ok and defined)
        if marker == 0xDB:  # quantisation tables: (precision << 4 | id, 64 or 128 bytes) each
            at = body
            while at < end:
                quantisation.add(data[at] & 0x0F)
                at += 1 + (128 if data[at] >> 4 else 64)
        elif marker == 0xC4:  # Huffman tables: (class << 4 | id, 16 counts, symbols) each
            at = body
            while at + 17 <= end:
                huffman.add((data[at] >> 4, data[at] & 0x0F))
                at += 17 + sum(data[at + 1:at + 17])
        if marker == 0xE1 and data.startswith(b"Exif\x00\x00", body):
            exif_segments += 1
            orientation = exif_orientation(data, body + 6, end) if exif_segments == 1 else None
        elif marker == 0xE1 and data.startswith(XMP_PREFIX, body):
            xmp = True
        elif marker == 0xEE and length >= 14 and data.startswith(b"Adobe", body):
            adobe = data[body + 11]
        elif marker in SOF_MARKERS:
            if length < 8 or frame is not None:
                return None
            count = data[body + 5]
            if length < 8 + 3 * count:
                return None
            components = [data[body + 6 + 3 * k:body + 9 + 3 * k] for k in range(count)]
            used_quantisation = {c[2] for c in components}
            sampling_ok = all(1 <= c[1] >> 4 <= 4 and 1 <= c[1] & 0x0F <= 4 for c in components)
            frame = JpegHeader(sof=marker, precision=data[body], height=_u16(data, body + 1),
                               width=_u16(data, body + 3), component_ids=tuple(c[0] for c in components),
                               adobe_transform=adobe, orientation=orientation, xmp=xmp, tables_ok=sampling_ok)
        pos = end
    return None


def gpu_refusal(header: JpegHeader | None, data: bytes, mode: str) -> str | None:
    """Why this file goes through the CPU path instead of nvJPEG; None when the GPU takes it."""
    if header is None:
        return "not_jpeg" if not data.startswith(JPEG_MAGIC) else "unreadable_header"
    if header.sof not in SEQUENTIAL_HUFFMAN:
        return "progressive" if header.sof in (0xC2, 0xC6, 0xCA, 0xCE) else "unsupported_coding"
    if header.precision != 8:
        return "not_8_bit"
    if not header.tables_ok:
        return "bad_tables"
    if header.components not in (1, 3):
        return "cmyk" if header.components == 4 else "components"
    if header.components == 3 and (header.adobe_transform == 0 or header.component_ids == (82, 71, 66)):
        return "rgb_coded"  # stored as RGB, not YCbCr: libjpeg converts differently
    if header.orientation is None or header.orientation > 8 or (header.orientation == 1 and header.xmp):
        return "orientation"  # unreadable EXIF, or an XMP orientation that Pillow would apply
    if header.width == 0 or header.height == 0:
        return "no_size"
    if data.rfind(b"\xff\xd9") < 0:
        return "truncated"  # no end marker: nvJPEG may return a grey-filled picture where Pillow refuses
    if mode not in ("RGB", "L"):
        return "mode"
    return None


@dataclass(frozen=True)
class PendingJpeg:
    """A request's JPEG, validated on the CPU and waiting for the batch's nvJPEG call."""

    data: bytes
    orientation: int
    size: tuple[int, int]  # (width, height) after orientation
    target: tuple[int, int]  # (width, height) after the resize, before the crop


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """CxHxW `image` as Pillow's `ImageOps.exif_transpose` turns it for this EXIF orientation."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)
    return image


def _aa_filter(kind: str, x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    if kind == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # torch's (and Pillow's) antialiased bicubic
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=1024)
def resize_weights(kind: str, in_size: int, out_size: int, start: int, count: int) -> np.ndarray:
    """Rows start..start+count of the (out_size x in_size) matrix of torch's antialiased resize along one axis
    (`interpolate(..., antialias=True, align_corners=False)`): output pixel i = sum_j W[i, j] * input[j]."""
    interp_size = GPU_RESAMPLING[kind]
    scale = in_size / out_size
    support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((count, in_size), dtype=np.float64)
    for row, i in enumerate(range(start, start + count)):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = _aa_filter(kind, (np.arange(xmin, xmax) - center + 0.5) * invscale)
        total = taps.sum()
        weights[row, xmin:xmax] = taps / total if total != 0 else taps
    weights.setflags(write=False)
    return weights


class GpuImages:
    """Batched decoding and preprocessing on `device` for an `ImagePreprocessor`'s settings.

    `device` may be the CPU: torchvision decodes JPEGs there too, so tests exercise every step of this path
    (selection, fallbacks, batching, orientation, resize weights) without a GPU.
    """

    def __init__(self, preprocess: ImagePreprocessor, device: torch.device | str,
                 max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS) -> None:
        if preprocess.resample not in GPU_RESAMPLING:
            raise ValueError(f"the GPU path resizes with {', '.join(GPU_RESAMPLING)}; not {preprocess.resample!r}")
        self.preprocess = preprocess
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_batch_pixels = max_batch_pixels
        self.channels = len(preprocess.mode)
        self.side = preprocess.output_shape[1]
        # fp16 holds every 8-bit value exactly and runs the resize products on tensor cores; the CPU has no
        # fast fp16 matrix product
        self.work_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.counts: Counter[str] = Counter()
        mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (-mean / std).to(self.device)
        self._weights: dict[tuple[int, ...], torch.Tensor] = {}

    @classmethod
    def for_handler(cls, preprocess: ImagePreprocessor, device: torch.device,
                    config: Mapping[str, Any]) -> GpuImages | None:
        """The GPU path for a handler on `device`; None on a CPU, with `gpu_decode: false`, or for a resample
        filter the GPU path does not compute (then the handler decodes on the CPU as before)."""
        if device.type != "cuda" or not bool(config.get("gpu_decode", True)):
            return None
        if preprocess.resample not in GPU_RESAMPLING:
            log.warning("GPU decoding off: resample=%s is computed by Pillow only", preprocess.resample)
            return None
        pixels = int(config.get("gpu_max_batch_pixels", DEFAULT_MAX_BATCH_PIXELS))
        log.info("decoding JPEGs on %s (nvJPEG, batched), other formats on the CPU", device)
        return cls(preprocess, device, pixels)

    def warm_up(self) -> None:
        """nvJPEG's handle, buffers and hardware engines start on the first call: make it before serving."""
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (320, 240), (90, 140, 200)).save(buffer, format="JPEG")
        self.collate([self.validate(buffer.getvalue())] * 2)
        self.counts.clear()

    # ---- per request, on the CPU ------------------------------------------------------------------
    def validate(self, data: bytes) -> PendingJpeg | torch.Tensor:
        """A JPEG the GPU will decode, checked from its header; or, for anything else, the CPU path's pixels
        (CxHxW uint8, resized and cropped). Raises the request's RequestError."""
        header = read_jpeg_header(data)
        refusal = gpu_refusal(header, data, self.preprocess.mode)
        if refusal is not None or header is None:
            self.counts[f"cpu:{refusal}"] += 1
            return self.preprocess.pixels(data)
        width, height = header.oriented_size
        if width * height > self.preprocess.max_pixels:
            raise PayloadTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                                  f"{self.preprocess.max_pixels}")
        target = self.preprocess.resized_size(width, height)
        self.counts["gpu"] += 1
        return PendingJpeg(data, header.orientation or 1, (width, height), target)

    # ---- per batch, on the device -----------------------------------------------------------------
    def decode_batch(self, items: Sequence[Any], dtype: torch.dtype = torch.float32) -> list[Any]:
        """Every item ready for the model: normalised CxSxS tensors on the device in `dtype`, or the
        RequestError of an item that could not be decoded. Items already normalised (float) pass through."""
        out: list[Any] = list(items)
        pending = [n for n, item in enumerate(items) if isinstance(item, PendingJpeg)]
        for chunk in self._chunks(pending, items):
            jpegs: list[PendingJpeg] = [items[n] for n in chunk]
            decoded = self._decode_jpegs(jpegs)
            images = {k: d for k, d in enumerate(decoded) if isinstance(d, _Decoded)}
            for k, normalised in self._resize_crop({k: (d.image, jpegs[k]) for k, d in images.items()}, dtype).items():
                out[chunk[k]] = normalised
            for k, d in enumerate(decoded):
                if not isinstance(d, _Decoded):
                    out[chunk[k]] = d  # CPU-path pixels (normalised below) or a RequestError
        pixels = [n for n, item in enumerate(out) if isinstance(item, torch.Tensor) and item.dtype == torch.uint8]
        if pixels:
            for n, tensor in zip(pixels, self._upload([out[n] for n in pixels], dtype).unbind(0), strict=True):
                out[n] = tensor
        return out

    def collate(self, items: Sequence[Any], dtype: torch.dtype = torch.float32,
                channels_last: bool = False) -> torch.Tensor:
        """The model's input batch (NCHW, `dtype`, on the device); raises the first item's RequestError."""
        ready = self.decode_batch(items, dtype)
        for item in ready:
            if isinstance(item, RequestError):
                raise item
        if all(t.device == self.device for t in ready):
            batch = torch.stack(ready).to(dtype)
        else:  # e.g. float tensors made on the CPU (a warm-up batch)
            batch = torch.stack([t.to("cpu") for t in ready]).to(self.device, dtype, non_blocking=True)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    # ---- internals --------------------------------------------------------------------------------
    def _chunks(self, pending: list[int], items: Sequence[Any]) -> list[list[int]]:
        chunks: list[list[int]] = []
        current: list[int] = []
        pixels = 0
        for n in pending:
            width, height = items[n].size
            if current and pixels + width * height > self.max_batch_pixels:
                chunks.append(current)
                current, pixels = [], 0
            current.append(n)
            pixels += width * height
        if current:
            chunks.append(current)
        return chunks

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        mode = ImageReadMode.RGB if self.preprocess.mode == "RGB" else ImageReadMode.GRAY
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision >= 0.29 warns that its decoders move to TorchCodec
            decoded = decode_jpeg(data, mode=mode, device=self.device)
        return list(decoded) if isinstance(decoded, list) else [decoded]

    def _decode_jpegs(self, jpegs: list[PendingJpeg]) -> list[Any]:
        """One nvJPEG call for all; when it fails, one call per image, then the CPU path for the refused."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns that bytes are read-only; nvJPEG only reads them
            data = [torch.frombuffer(j.data, dtype=torch.uint8) for j in jpegs]
        try:
            return [_Decoded(image) for image in self._decode(data)]
        except RuntimeError as exc:
            log.info("batched JPEG decoding failed (%s); decoding the %d images one by one", exc, len(jpegs))
        results: list[Any] = []
        for tensor, jpeg in zip(data, jpegs, strict=True):
            try:
                results.append(_Decoded(self._decode([tensor])[0]))
                continue
            except RuntimeError:
                self.counts["cpu:refused_by_decoder"] += 1
            try:
                results.append(self.preprocess.pixels(jpeg.data))
            except RequestError as error:
                results.append(error)
            except Exception as exc:  # a decoder fault answers this request, not the batch
                results.append(UndecodableInput(f"the image could not be decoded: {type(exc).__name__}: {exc}"))
        return results

    def _weights_for(self, axis_in: int, axis_out: int, start: int, count: int, padded: int) -> torch.Tensor:
        key = (axis_in, axis_out, start, count, padded)
        cached = self._weights.get(key)
        if cached is None:
            weights = np.zeros((count, padded), dtype=np.float64)
            weights[:, :axis_in] = resize_weights(self.preprocess.resample, axis_in, axis_out, start, count)
            cached = torch.from_numpy(weights).to(self.device, self.work_dtype)
            if len(self._weights) > 4096:
                self._weights.clear()
            self._weights[key] = cached
        return cached

    def _crop_box(self, target: tuple[int, int]) -> tuple[int, int, int, int]:
        """(left, top, width, height) of what the crop keeps of the resized image."""
        if self.preprocess.crop is None:
            return 0, 0, target[0], target[1]
        from handlers.images import center_crop_box

        left, top, _, _ = center_crop_box(target[0], target[1], self.preprocess.crop)
        return left, top, self.preprocess.crop, self.preprocess.crop

    def _resize_crop(self, images: Mapping[int, tuple[torch.Tensor, PendingJpeg]],
                     dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """Oriented, resized, cropped and normalised, grouped by size so each group is two batched products."""
        groups: dict[tuple[int, int], list[int]] = {}
        for k, (_, jpeg) in images.items():
            width, height = jpeg.size
            groups.setdefault((math.ceil(height / SIZE_BUCKET), math.ceil(width / SIZE_BUCKET)), []).append(k)
        out: dict[int, torch.Tensor] = {}
        for keys in groups.values():
            height_max = max(images[k][1].size[1] for k in keys)
            width_max = max(images[k][1].size[0] for k in keys)
            buffer = torch.zeros((len(keys), self.channels, height_max, width_max), dtype=self.work_dtype,
                                 device=self.device)
            rows, columns = [], []
            for slot, k in enumerate(keys):
                image, jpeg = images[k]
                width, height = jpeg.size
                buffer[slot, :, :height, :width].copy_(orient(image, jpeg.orientation))
                left, top, crop_w, crop_h = self._crop_box(jpeg.target)
                columns.append(self._weights_for(width, jpeg.target[0], left, crop_w, width_max))
                rows.append(self._weights_for(height, jpeg.target[1], top, crop_h, height_max))
            # horizontal pass, rounded to 8 bits as the CPU path's uint8 kernel does, then vertical
            horizontal = torch.matmul(buffer, torch.stack(columns).transpose(1, 2).unsqueeze(1))
            horizontal = horizontal.round_().clamp_(0, 255)
            resized = torch.matmul(torch.stack(rows).unsqueeze(1), horizontal).round_().clamp_(0, 255)
            normalised = (resized.float() * self._scale + self._shift).to(dtype)
            for slot, k in enumerate(keys):
                out[k] = normalised[slot]
        return out

    def _upload(self, pixels: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """CPU-decoded uint8 pixels to the device through pinned memory, normalised there."""
        stacked = torch.stack([p.to("cpu") for p in pixels])
        if self.device.type == "cuda":
            stacked = stacked.pin_memory()
        on_device = stacked.to(self.device, non_blocking=True)
        return (on_device.float() * self._scale + self._shift).to(dtype)


@dataclass(frozen=True)
class _Decoded:
    """An image nvJPEG decoded (CxHxW uint8 on the device, before orientation)."""

    image: torch.Tensor
