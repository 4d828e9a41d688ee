"""Class maps (one class index per pixel) in the compact forms a segmentation answer carries, and back.

    png   base64 of an 8-bit palette PNG whose pixel values are the class indices (Pascal VOC's colour map, so it
          also looks right in an image viewer); any PNG reader gives the indices back (Pillow: mode "P",
          `numpy.asarray(image)`)
    rle   row-major runs: {"values": [class, ...], "lengths": [run, ...]}; the map is `numpy.repeat(values,
          lengths).reshape(height, width)`

Both are lossless. `shares` gives each present class's share of the pixels. The decoders are used by the tests and
the load generator to check answers against references.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image

OUTPUTS = ("png", "rle")
#: EXIF orientations that swap width and height (ImageOps.exif_transpose turns these by 90 degrees)
_TRANSPOSED = (5, 6, 7, 8)

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class SegmentBatch:
    """A collated batch: the model's input and each image's original size."""

    pixels: torch.Tensor
    sizes: list[Size]


@dataclass(frozen=True)
class ClassMaps:
    """What `infer` returns: each image's class map, on the CPU, at its output size. Indexable like a list of rows
    (so it unbatches as `list(output)` as well as through `unbatch`)."""

    maps: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.maps[index]


def original_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image file as the image handler sees it after EXIF orientation, from its header."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception:  # a broken EXIF block: exif_transpose ignores it too
            orientation = 1
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def voc_palette() -> list[int]:
    """Pascal VOC's colour map (the bit-interleaved one its devkit uses), 256 entries as a flat RGB list."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = voc_palette()


def to_png(class_map: np.ndarray[Any, Any]) -> str:
    """Base64 of an 8-bit palette PNG of `class_map` (H x W, values < 256). compress_level 1: the maps are large
    flat regions, which compress nearly as well at the fastest level (a few times faster than the default)."""
    image = Image.fromarray(np.ascontiguousarray(class_map, dtype=np.uint8), "P")
    image.putpalette(_PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode()


def from_png(encoded: str) -> np.ndarray[Any, Any]:
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"a class-map PNG is palette or grey; got mode {image.mode}")
        return np.asarray(image)


def to_rle(class_map: np.ndarray[Any, Any]) -> dict[str, list[int]]:
    flat = np.ascontiguousarray(class_map).ravel()
    if flat.size == 0:
        return {"values": [], "lengths": []}
    starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    lengths = np.diff(np.append(starts, flat.size))
    return {"values": flat[starts].tolist(), "lengths": lengths.tolist()}


def from_rle(rle: dict[str, Any], width: int, height: int) -> np.ndarray[Any, Any]:
    values, lengths = np.asarray(rle["values"], dtype=np.int64), np.asarray(rle["lengths"], dtype=np.int64)
    flat = np.repeat(values, lengths)
    if flat.size != width * height:
        raise ValueError(f"the runs cover {flat.size} pixels; a {width}x{height} map has {width * height}")
    return flat.reshape(height, width)


def shares(class_map: torch.Tensor, labels: list[str], digits: int = 6) -> dict[str, float]:
    """Each present class's share of the pixels, largest first, rounded to `digits` places."""
    flat = class_map.flatten()
    counts = torch.bincount(flat if flat.dtype == torch.uint8 else flat.long(), minlength=len(labels))
    total = max(int(class_map.numel()), 1)
    present = [(int(c), i) for i, c in enumerate(counts.tolist()) if c]
    return {labels[i]: round(c / total, digits) for c, i in sorted(present, reverse=True)}


def answer_map(answer: Any) -> np.ndarray[Any, Any]:
    """The class map of a tsforge segmentation answer ({"png"} or {"rle"} with "width" and "height"), or of the
    stock image_segmenter's ([H][W][class, probability] lists)."""
    if isinstance(answer, dict) and "png" in answer:
        return from_png(answer["png"])
    if isinstance(answer, dict) and "rle" in answer:
        return from_rle(answer["rle"], int(answer["width"]), int(answer["height"]))
    if isinstance(answer, list):
        stacked = np.asarray(answer, dtype=np.float32)
        if stacked.ndim == 3 and stacked.shape[2] == 2:
            return stacked[:, :, 0].astype(np.int64)
    raise ValueError("not a class-map answer: expected {\"png\" | \"rle\", \"width\", \"height\"} or [H][W][class, p]")

