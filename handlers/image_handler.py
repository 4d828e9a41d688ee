"""Handler for image classifiers: an image in (JPEG, PNG, WebP, BMP, GIF, TIFF; raw, base64 or in JSON),
the label and the top-k probabilities out.

Settings, all optional, in the archive's model-config.yaml `handler:` section:

    backend: auto          torchscript | onnxruntime | aotinductor | auto (see handlers/autoselect.py)
    precision: auto        fp32 | bf16 | fp16 | int8 | auto: measured at worker start among what the
                           device runs natively and the archive carries
    channels_last: true    NHWC memory format (the layout oneDNN's fast convolutions want)
    onednn_fusion: auto    TorchScript on a CPU: TorchScript's oneDNN Graph fuser (conv+add+relu chains);
                           true | false | auto
    auto_tolerance: 0.02   largest change of any class probability against fp32 that `auto` accepts
    threads: 2             torch intra-op threads (default: CPU count / maxWorkers)
    mode: RGB              RGB | L
    resize: 256            shorter side; with crop: null, the image is scaled to resize x resize
    crop: 224              centre crop (null: none)
    mean: [0.485, 0.456, 0.406]
    std: [0.229, 0.224, 0.225]
    resample: bilinear     Pillow filter
    max_pixels: 40000000   larger images get 413
    draft: true            JPEG DCT-domain downscaling while decoding
    top_k: 5
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import torch

from handlers.base import BatchHandler, probability_discrepancy
from handlers.gpu_images import GpuImages
from handlers.images import ImagePreprocessor
from handlers.payload import as_bytes
from handlers.runtimes import PRECISIONS

log = logging.getLogger(__name__)


class ImageClassifierHandler(BatchHandler):
    """Returns `{"label": "tabby", "probabilities": {"tabby": 0.91, ...}}` with the top_k classes."""

    default_top_k = 5
    default_tolerance = 0.02

    def setup(self) -> None:
        self.preprocess = ImagePreprocessor.from_config(self.config)
        self.labels = self.read_labels()
        self.top_k = min(int(self.config.get("top_k", self.default_top_k)), len(self.labels))
        self.model = self.load_model()
        self.warm_up()

    def warm_up(self) -> None:
        """The TorchScript profiling executor (and the fuser) optimise per input shape on the first calls;
        make those for every batch size before serving."""
        started = time.perf_counter()
        blank = [torch.zeros(self.preprocess.output_shape)]
        with torch.inference_mode():
            for size in [*range(self.batch_size, 0, -1)] * 2:
                self.infer(self.collate(blank * size))
        log.info("warmed up for batches of 1 to %d in %.2fs", self.batch_size, time.perf_counter() - started)

    def discrepancy(self, reference: torch.Tensor, output: torch.Tensor) -> float:
        return probability_discrepancy(reference, output)

    def decode(self, payload: Any) -> Any:
        """On a CPU the whole preprocessing; on a GPU only the header check of a JPEG (the batch is decoded
        at once in `prepare_batch`), other formats decoded here on the CPU (handlers/gpu_images.py)."""
        gpu = self.gpu_images
        if gpu is None:
            return self.preprocess(payload)
        return gpu.validate(as_bytes(payload))

    def prepare_batch(self, items: list[Any]) -> list[Any]:
        gpu = self.gpu_images
        return items if gpu is None else gpu.decode_batch(items, self.input_dtype)

    def collate(self, items: list[Any]) -> torch.Tensor:
        gpu = self.gpu_images
        if gpu is None:
            batch: torch.Tensor = super().collate(items)
            return batch
        return gpu.collate(items, self.input_dtype, self.channels_last)

    @functools.cached_property
    def gpu_images(self) -> GpuImages | None:
        """The batched GPU decoder when this worker runs on CUDA (`gpu_decode: false` turns it off)."""
        gpu = GpuImages.for_handler(self.preprocess, self.device, self.config)
        if gpu is not None:
            gpu.warm_up()
        return gpu

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the served variant takes (TorchScript casts to its precision; other backends take fp32)."""
        if self.selection.get("backend", "torchscript") != "torchscript":
            return torch.float32
        return PRECISIONS.get(str(self.selection.get("precision")), torch.float32)

    def encode(self, row: torch.Tensor) -> dict[str, Any]:
        probabilities = torch.softmax(row.float(), dim=0)
        top = torch.topk(probabilities, k=self.top_k)
        return {
            "label": self.labels[int(top.indices[0])],
            "probabilities": {self.labels[int(i)]: round(float(p), 6) for p, i in
                              zip(top.values, top.indices, strict=True)},
        }
