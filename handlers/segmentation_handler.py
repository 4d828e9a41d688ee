"""Handler for image segmenters: an image in (any encoding the image handler reads), a compact class map out.

    {"width": 640, "height": 427, "png": "<base64 palette PNG of class indices>",
     "shares": {"__background__": 0.71, "person": 0.29}}

The class map (the argmax over classes of each pixel) is at the original image's size (after EXIF orientation)
by default, or at the model's input size with `output_size: model`. The argmax runs on the model's device and
only the map (one byte a pixel, 1/84 of the fp32 logits) is copied back; it is scaled to the image's size there
too, by nearest neighbour (a class index cannot be interpolated). Never a nested list of floats.

Settings in the archive's model-config.yaml `handler:` section (besides the image handler's decoding ones:
mode, resize, crop, mean, std, resample, max_pixels, draft, channels_last, threads, backend, precision):

    output: png            png | rle (row-major runs: {"values": [...], "lengths": [...]}; handlers/segmentation.py)
    output_size: original  original | model
    resize: 224            with crop: null, every image is scaled to resize x resize (the model's input)

v2 (Open Inference Protocol) outputs: `class_map` (BYTES: the base64 PNG, or the runs as JSON), `shares` (BYTES:
JSON), `size` (INT32 [N, 2]: width, height).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from handlers import oip, segmentation
from handlers.base import BatchHandler
from handlers.errors import UndecodableInput
from handlers.images import ImagePreprocessor
from handlers.payload import as_bytes
from handlers.segmentation import ClassMaps, SegmentBatch, Size

log = logging.getLogger(__name__)

class SegmentationHandler(BatchHandler):
    """Returns `{"width", "height", "png" | "rle", "shares": {label: share}}` per image."""

    def setup(self) -> None:
        self.preprocess = ImagePreprocessor.from_config({"resize": 224, "crop": None, **self.config})
        self.labels = self.read_labels()
        self.output = str(self.config.get("output", "png"))
        self.output_size = str(self.config.get("output_size", "original"))
        if self.output not in segmentation.OUTPUTS or self.output_size not in ("original", "model"):
            raise ValueError(f"handler.output must be one of {segmentation.OUTPUTS} and output_size original or "
                             f"model; got {self.output!r}, {self.output_size!r}")
        if self.output == "png" and len(self.labels) > 256:
            raise ValueError(f"{len(self.labels)} classes do not fit an 8-bit PNG; set handler.output: rle")
        self.map_dtype = torch.uint8 if len(self.labels) <= 256 else torch.int32
        self.model = self.load_model()
        self.warm_up()

    def warm_up(self) -> None:
        """TorchScript's profiling executor (and oneDNN) optimise per input shape on the first calls: make those
        for every batch size before serving."""
        started = time.perf_counter()
        blank = [(torch.zeros(self.preprocess.output_shape), (1, 1))]
        with torch.inference_mode():
            for size in [*range(self.batch_size, 0, -1)] * 2:
                self.infer(self.collate(blank * size))
        log.info("warmed up for batches of 1 to %d in %.2fs", self.batch_size, time.perf_counter() - started)

    # ---- hooks -------------------------------------------------------------------------------
    def decode(self, payload: Any) -> tuple[torch.Tensor, Size]:
        data = as_bytes(payload)
        pixels = self.preprocess.tensor(data)  # refuses what is not an image, or too large, with its 4xx
        try:
            size = segmentation.original_size(data)
        except Exception as exc:  # Pillow decoded it above; a header it cannot reread is still the client's
            raise UndecodableInput(f"cannot read the image's size: {type(exc).__name__}: {exc}") from None
        return pixels, size

    def collate(self, items: list[tuple[torch.Tensor, Size]]) -> SegmentBatch:
        pixels = torch.stack([item[0] for item in items]).to(self.device, non_blocking=True)
        return SegmentBatch(pixels, [item[1] for item in items])

    def sample_inputs(self) -> tuple[torch.Tensor, ...] | None:
        """The model's own input for timing variants: the collated batch without the sizes."""
        inputs = super().sample_inputs()
        if inputs is None:
            return None
        return tuple(i.pixels if isinstance(i, SegmentBatch) else i for i in inputs)

    def infer(self, batch: SegmentBatch) -> ClassMaps:
        logits = self.model(batch.pixels)
        maps = logits.argmax(dim=1).to(self.map_dtype)  # on the model's device: only the map is copied back
        if self.output_size == "model":
            return ClassMaps(list(maps.cpu().unbind(0)))
        return ClassMaps([resize_map(m, size).cpu() for m, size in zip(maps, batch.sizes, strict=True)])

    def unbatch(self, output: ClassMaps, count: int) -> list[torch.Tensor]:
        if len(output) != count:
            raise RuntimeError(f"the model answered {len(output)} images for a batch of {count}")
        return list(output.maps)

    def encode(self, row: torch.Tensor) -> dict[str, Any]:
        height, width = row.shape
        class_map = row.numpy()
        encoded: dict[str, Any] = ({"png": segmentation.to_png(class_map)} if self.output == "png"
                                   else {"rle": segmentation.to_rle(class_map)})
        return {"width": int(width), "height": int(height), **encoded,
                "shares": segmentation.shares(row, self.labels)}

    def encode_v2(self, rows: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
        answers = [self.encode(row) for row in rows]
        maps = [a["png"] if "png" in a else json.dumps(a["rle"]) for a in answers]
        sizes = np.asarray([[a["width"], a["height"]] for a in answers], dtype=np.int32).reshape(-1, 2)
        return [oip.output_tensor("class_map", maps),
                oip.output_tensor("shares", [json.dumps(a["shares"]) for a in answers]),
                oip.output_tensor("size", sizes)]

    def discrepancy(self, reference: torch.Tensor, output: torch.Tensor) -> float:
        """For `precision: auto` on the raw logits: the share of pixels whose class differs from fp32's."""
        return float((reference.argmax(1) != output.argmax(1)).float().mean())


def resize_map(class_map: torch.Tensor, size: Size) -> torch.Tensor:
    """A class map scaled to (width, height) by nearest neighbour (nearest-exact: pixel centres, as Pillow's
    NEAREST does), on whatever device it is."""
    width, height = size
    if tuple(class_map.shape) == (height, width):
        return class_map
    grid = class_map[None, None]
    if grid.dtype != torch.uint8:  # nearest interpolation has no kernel for wide integers
        grid = grid.float()
    scaled = F.interpolate(grid, size=(height, width), mode="nearest-exact")
    return scaled[0, 0].to(class_map.dtype)
