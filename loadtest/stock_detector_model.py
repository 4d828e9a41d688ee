"""The model file TorchServe's stock `object_detector` loads in `make bench MODEL=detector` (`--model-file`).

The stock handler cannot serve the scripted export: its preprocess stacks the images into one [N, 3, H, W] tensor,
which a scripted torchvision detector refuses (it takes List[Tensor]), and it reads the output as a list of dicts,
where a scripted one returns (losses, detections). So it gets what TorchServe's own examples use: this eager
architecture plus a state dict (the export's own weights under `model.`, loadtest/bench.py `stock_model`), which its
BaseHandler reads with torch.load (weights_only by default in torch >= 2.6: no pickled code). TorchServe instantiates
the one class this file defines, without arguments.
"""

from __future__ import annotations

from typing import Any

import torch


class StockDetector(torch.nn.Module):
    """torchvision's Faster R-CNN MobileNetV3-Large 320 FPN (the detector archive's architecture), eager."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

        # weights_backbone=None: the default would download ImageNet weights; the state dict replaces all of them
        self.model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)

    def forward(self, images: Any) -> Any:
        return self.model(images)
