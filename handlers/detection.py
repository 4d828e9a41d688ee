"""What the detection handler (handlers/detection_handler.py) works with, outside its file: TorchServe wants exactly
one class in a handler's module."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

#: torchvision's GeneralizedRCNNTransform pads a batch to multiples of this; images padded alike share a batch
SIZE_DIVISIBLE = 32


@dataclass(frozen=True)
class DetectionInput:
    """One decoded image: [3, h, w] floats in [0, 1] at the model's size, and the size it was sent at."""

    pixels: torch.Tensor
    width: int
    height: int

    @property
    def padded(self) -> tuple[int, int]:
        """(rows, columns) of SIZE_DIVISIBLE blocks the detector pads this image to."""
        _, h, w = self.pixels.shape
        return -(-h // SIZE_DIVISIBLE), -(-w // SIZE_DIVISIBLE)


def model_size(width: int, height: int, min_size: int, max_size: int,
               fixed_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) the detector's transform scales an image to: `fixed_size` (SSD's: every image stretched to
    it), else Python floats, as its eager code computes (the scripted code uses float32, which can give one pixel
    less: 427 -> 319; the handler's resize avoids that)."""
    if fixed_size is not None:
        return fixed_size
    scale = min(min_size / min(width, height), max_size / max(width, height))
    return math.floor(width * scale), math.floor(height * scale)


def to_original_pixels(item: DetectionInput, boxes: torch.Tensor) -> torch.Tensor:
    """Boxes from the model's input size to the image's, with the ratios computed as the detector's own postprocess
    computes them (float32 tensors), so they equal the eager model's on the image as sent."""
    _, h, w = item.pixels.shape
    ratio_h = torch.tensor(item.height, dtype=torch.float32) / torch.tensor(h, dtype=torch.float32)
    ratio_w = torch.tensor(item.width, dtype=torch.float32) / torch.tensor(w, dtype=torch.float32)
    return boxes.float().cpu() * torch.stack([ratio_w, ratio_h, ratio_w, ratio_h])


def detections_of(output: Any) -> list[dict[str, torch.Tensor]]:
    """A detector's per-image dicts: eager torchvision returns the list, a scripted one (losses, the list)."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], list):
        output = output[1]
    if not isinstance(output, list) or not all(isinstance(d, dict) and {"boxes", "labels", "scores"} <= set(d)
                                               for d in output):
        raise ValueError(f"expected a list of {{'boxes', 'labels', 'scores'}} dicts, got {type(output).__name__}")
    return output
