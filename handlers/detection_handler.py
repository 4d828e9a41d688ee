"""Handler for object detectors: an image in (any encoding the image handler reads), boxes out.

    {"detections": [{"label": "dog", "score": 0.91, "box": [x1, y1, x2, y2]}, ...]}

Boxes are xyxy in the pixels of the image as sent (after EXIF orientation), sorted by score. The model is a
scripted torchvision detector (a list of [3, H, W] images in [0, 1] in; `(losses, [{"boxes", "labels", "scores"}])`
out). Its own transform resizes each image so that the shorter side is `min_size`, unless the longer side would
pass `max_size` (or stretches it to `fixed_size`); the handler does that resize itself, with the same arithmetic
(float, bilinear, no antialias), so the model's resize is an identity and a batch carries small images; the boxes
are scaled back here.

Settings in the archive's model-config.yaml `handler:` section:

    min_size: 320          the detector's transform.min_size (`tsforge new` reads it from the model)
    max_size: 640          its transform.max_size
    fixed_size: [320, 320] its transform.fixed_size (width, height: SSD stretches every image to it), or absent
    score_threshold: 0.5   detections below it are dropped
    max_detections: 100    at most this many per image, the best first
    max_pixels: 40000000   larger images are answered with 413 (handlers/images.py)
    threads: 1             torch intra-op threads
    onednn_fusion: auto    true: serve the program frozen and optimised for inference (CPU), false: as exported,
                           auto: the faster here whose detections keep the model's bound (`handlers.accuracy`)

v2 (Open Inference Protocol) outputs, one row per detection of all the request's images: `boxes` FP32 [-1, 4],
`scores` FP32 [-1], `labels` BYTES [-1], `image` INT32 [-1] (the index of the input image it belongs to).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from handlers import accuracy, oip
from handlers.base import BatchHandler
from handlers.detection import DetectionInput, detections_of, model_size, to_original_pixels
from handlers.errors import InvalidInput, UndecodableInput
from handlers.images import DEFAULT_MAX_PIXELS, open_image, to_mode
from handlers.payload import as_bytes
from handlers.runtimes import Artefacts, Variant, VariantUnavailable

log = logging.getLogger(__name__)


class DetectionHandler(BatchHandler):
    """Returns `{"detections": [{"label", "score", "box": [x1, y1, x2, y2]}]}` per image."""

    default_backend = "torchscript"
    default_precision = "fp32"
    #: the largest 1 - F1 of a variant's detections against fp32's on the example images that `auto` accepts
    default_tolerance = 0.1

    def setup(self) -> None:
        self.min_size = int(self.config.get("min_size", 320))
        self.max_size = int(self.config.get("max_size", 640))
        fixed = self.config.get("fixed_size")
        self.fixed_size = None if fixed is None else (int(fixed[0]), int(fixed[1]))
        self.score_threshold = float(self.config.get("score_threshold", 0.5))
        self.max_detections = int(self.config.get("max_detections", 100))
        self.max_pixels = int(self.config.get("max_pixels", DEFAULT_MAX_PIXELS))
        if self.max_detections < 1 or not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"handler.max_detections must be >= 1 and score_threshold in [0, 1]; got "
                             f"{self.max_detections}, {self.score_threshold}")
        self.labels = self.read_labels()
        self.model = self.load_model()
        self.warm_up()

    def load_variant(self, variant: Variant, artefacts: Artefacts) -> Any:
        """The scripted detector as exported, or (`fusion`, on a CPU) frozen and optimised for inference:
        batch norm folded into the convolutions, which run as oneDNN (MKL-DNN) kernels. A detector takes a list
        of images and returns dicts, which the int8/ONNX/AOTInductor runners (tensors only) do not carry."""
        if variant.backend != "torchscript" or variant.precision != "fp32":
            raise VariantUnavailable(f"a detector is served as scripted fp32 TorchScript, not {variant.name}")
        import torchvision  # noqa: F401  (registers the ops the program calls: torchvision::nms, roi_align)

        program = torch.jit.load(str(artefacts.path(variant)), map_location=self.device)  # type: ignore[no-untyped-call]
        program = program.eval()
        if variant.fusion and self.device.type == "cpu":
            program = torch.jit.optimize_for_inference(torch.jit.freeze(program))
        return program

    def warm_up(self) -> None:
        """TorchScript's profiling executor optimises on the first calls; make them before serving."""
        started = time.perf_counter()
        blank = DetectionInput(torch.zeros(3, self.min_size, self.min_size), self.min_size, self.min_size)
        with torch.inference_mode():
            for _ in range(2):
                self.infer(self.collate([blank]))
        log.info("warmed up in %.2fs", time.perf_counter() - started)

    # ---- hooks -------------------------------------------------------------------------------
    def decode(self, payload: Any) -> DetectionInput:
        """Decode (4xx for what is not an image, truncated, too large or empty), orient, then resize as the model
        would (float, bilinear, align_corners=False: the same sampling as its transform)."""
        data = as_bytes(payload)
        if not data:
            raise UndecodableInput("the image is empty (0 bytes); send an image file (JPEG, PNG, WebP, BMP, GIF, TIFF)")
        # no JPEG draft (DCT-domain downscaling): the answers stay those of the model on the full decode
        image = to_mode(open_image(data, self.max_pixels), "RGB")
        width, height = image.size
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        target_w, target_h = model_size(pixels.shape[2], pixels.shape[1], self.min_size, self.max_size, self.fixed_size)
        if min(target_w, target_h) < 1:
            raise InvalidInput(f"the image is {width}x{height}: scaled to fit {self.max_size} pixels it would have no "
                               "rows or columns; its aspect ratio is too extreme")
        if (target_w, target_h) != (pixels.shape[2], pixels.shape[1]):
            pixels = F.interpolate(pixels[None], size=(target_h, target_w), mode="bilinear", align_corners=False)[0]
        return DetectionInput(pixels, width, height)

    def collate(self, items: list[DetectionInput]) -> list[DetectionInput]:
        """Images of different sizes cannot be stacked; the model takes a list (grouped in `infer`)."""
        return items

    def infer(self, batch: list[DetectionInput]) -> list[dict[str, torch.Tensor]]:
        """One model call per group of images that the detector pads to the same size. Its transform pads a batch
        to its largest image, and the padding changes the features near the border: grouped this way each image
        gets the answer it would get alone. Returns each image's detections, boxes in its original pixels."""
        groups: dict[tuple[int, int], list[int]] = {}
        for n, item in enumerate(batch):
            groups.setdefault(item.padded, []).append(n)
        found: list[dict[str, torch.Tensor]] = [{} for _ in batch]
        for members in groups.values():
            images = [batch[n].pixels.to(self.device, non_blocking=True) for n in members]
            _, detections = self.model(images)
            for n, detection in zip(members, detections, strict=True):
                found[n] = self._in_original_pixels(batch[n], detection)
        return found

    def _in_original_pixels(self, item: DetectionInput, detection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The boxes in the image's pixels, filtered by the threshold and cut to the best `max_detections`."""
        return self._kept({**detection, "boxes": to_original_pixels(item, detection["boxes"])})

    def _kept(self, detection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The detections at or above the score threshold, best first, at most `max_detections`, on the CPU."""
        scores = detection["scores"].float().cpu()
        keep = torch.argsort(scores, descending=True, stable=True)
        keep = keep[scores[keep] >= self.score_threshold][: self.max_detections]
        return {"boxes": detection["boxes"].float().cpu()[keep], "scores": scores[keep],
                "labels": detection["labels"].cpu()[keep]}

    def unbatch(self, output: list[dict[str, torch.Tensor]], count: int) -> list[dict[str, torch.Tensor]]:
        if len(output) != count:
            raise RuntimeError(f"the detector answered {len(output)} images for a batch of {count}")
        return list(output)

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)

    def encode(self, row: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"detections": [
            {"label": self.label(int(label)), "score": round(float(score), 6),
             "box": [round(float(v), 2) for v in box]}
            for box, score, label in zip(row["boxes"], row["scores"], row["labels"], strict=True)]}

    def encode_v2(self, rows: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
        boxes = np.concatenate([r["boxes"].numpy().reshape(-1, 4) for r in rows]).astype(np.float32)
        scores = np.concatenate([r["scores"].numpy() for r in rows]).astype(np.float32)
        labels = [self.label(int(i)) for r in rows for i in r["labels"]]
        image = np.concatenate([np.full(len(r["scores"]), n, dtype=np.int32) for n, r in enumerate(rows)])
        return [oip.output_tensor("boxes", boxes), oip.output_tensor("scores", scores),
                oip.output_tensor("labels", labels), oip.output_tensor("image", image)]

    def sample_inputs(self) -> tuple[list[torch.Tensor]] | None:
        """Two example images as the model takes them (one list), for timing the variants: detectors are slow
        enough for the timings to be steady, and a full batch would spend the selection budget."""
        items: tuple[DetectionInput, ...] | None = super().sample_inputs()
        return None if items is None else ([item.pixels.to(self.device) for item in items[:2]],)

    def discrepancy(self, reference: Any, output: Any) -> float:
        """For `auto` on a batch of example images: 1 - the detections' F1 against fp32's (`handlers.accuracy`),
        above the score threshold."""
        rows = [[self.heldout_row(self._kept(d)) for d in detections_of(out)] for out in (reference, output)]
        return 1.0 - accuracy.detection_f1(rows[0], rows[1])

    def heldout_row(self, row: dict[str, torch.Tensor]) -> torch.Tensor:
        """[K, 6]: x1, y1, x2, y2, score, label of each detection, for `handlers.accuracy.detection_f1`."""
        return torch.cat([row["boxes"].float().reshape(-1, 4), row["scores"].float().reshape(-1, 1),
                          row["labels"].float().reshape(-1, 1)], dim=1)
