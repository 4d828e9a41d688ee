"""Handler for image classifiers: an image in (JPEG, PNG, WebP, BMP, GIF, TIFF; raw, base64 or in JSON),
the label and the top-k probabilities out.

Settings, all optional, in the archive's model-config.yaml `handler:` section:

    precision: bf16        fp32 | bf16 | fp16, applied to the fp32 TorchScript export before freezing
    channels_last: true    NHWC memory format (with bf16 on AMX CPUs several times faster than fp32)
    onednn_fusion: true    CPU only: let TorchScript's oneDNN Graph fuser fuse conv+add+relu chains
                           (ResNet-18 bf16 on AMX: 7.8 instead of 10.9 ms an image on one thread)
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

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from handlers.base import BatchHandler
from handlers.images import ImagePreprocessor

log = logging.getLogger(__name__)


def compile_for_serving(model: torch.jit.ScriptModule, dtype: torch.dtype,
                        channels_last: bool) -> torch.jit.ScriptModule:
    """Cast, re-layout, then freeze: freezing folds the weights into constants (and conv+batch-norm into one
    conv), after which `.to(dtype)` or `.to(memory_format=...)` no longer reach them, so the order matters.
    Offline checks call this too, so they run exactly the program the server runs."""
    model = model.eval().to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    frozen: torch.jit.ScriptModule = torch.jit.freeze(model)
    return frozen


@contextlib.contextmanager
def onednn_fusion(enabled: bool) -> Iterator[None]:
    """TorchScript's oneDNN Graph fuser is a process-wide switch; turn it on only around our own calls."""
    previous = bool(torch.jit.onednn_fusion_enabled())  # type: ignore[no-untyped-call]
    torch.jit.enable_onednn_fusion(enabled)
    try:
        yield
    finally:
        torch.jit.enable_onednn_fusion(previous)


class ImageClassifierHandler(BatchHandler):
    """Returns `{"label": "tabby", "probabilities": {"tabby": 0.91, ...}}` with the top_k classes."""

    default_top_k = 5

    def setup(self) -> None:
        self.preprocess = ImagePreprocessor.from_config(self.config)
        self.labels = self.read_labels()
        self.top_k = min(int(self.config.get("top_k", self.default_top_k)), len(self.labels))
        self.model = compile_for_serving(self.load_torchscript(), self.dtype, self.channels_last)
        self.fuse = bool(self.config.get("onednn_fusion", False)) and self.device.type == "cpu"
        self.warm_up()

    def warm_up(self) -> None:
        """The TorchScript profiling executor (and the fuser) optimise per input shape on the first calls;
        make those for every batch size before serving."""
        batch_size = int((self.context.model_yaml_config or {}).get("batchSize") or 1)
        started = time.perf_counter()
        blank = [torch.zeros(self.preprocess.output_shape)]
        with torch.inference_mode():
            for size in [*range(batch_size, 0, -1)] * 2:
                self.infer(self.collate(blank * size))
        log.info("warmed up for batches of 1 to %d in %.2fs", batch_size, time.perf_counter() - started)

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        with onednn_fusion(self.fuse):
            output: torch.Tensor = self.model(batch)
        return output

    def decode(self, payload: Any) -> torch.Tensor:
        return self.preprocess(payload)

    def encode(self, row: torch.Tensor) -> dict[str, Any]:
        probabilities = torch.softmax(row.float(), dim=0)
        top = torch.topk(probabilities, k=self.top_k)
        return {
            "label": self.labels[int(top.indices[0])],
            "probabilities": {self.labels[int(i)]: round(float(p), 6) for p, i in
                              zip(top.values, top.indices, strict=True)},
        }
