"""Handler for the digits CNN: an image or a JSON 8x8 array in, the label and top-3 out."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from handlers.base import BatchHandler, probability_discrepancy
from handlers.errors import InvalidInput
from handlers.images import open_image, to_mode
from handlers.payload import as_array, as_bytes, is_numeric_json, unwrap

SIDE = 8


class DigitsHandler(BatchHandler):
    """Accepts PNG/JPEG (any size; resized to 8x8 grey, dark ink on light paper inverted) or a JSON
    array of 64 ink intensities in [0, 1] shaped 8x8, 1x8x8 or flat. Returns
    `{"label": "7", "probabilities": {"7": 0.98, ...}}` with the top 3 classes."""

    default_tolerance = 0.02

    def setup(self) -> None:
        self.labels = self.read_labels()
        self.top_k = int(self.config.get("top_k", 3))
        self.max_pixels = int(self.config.get("max_pixels", 4_000_000))
        super().setup()

    def discrepancy(self, reference: torch.Tensor, output: torch.Tensor) -> float:
        return probability_discrepancy(reference, output)

    def decode(self, payload: Any) -> torch.Tensor:
        payload = unwrap(payload)
        if is_numeric_json(payload):
            return torch.from_numpy(self._check_array(as_array(payload)))
        image = to_mode(open_image(as_bytes(payload), self.max_pixels), "L")
        if image.size != (SIDE, SIDE):
            image = image.resize((SIDE, SIDE), Image.Resampling.BOX)  # area average keeps thin strokes
        grey = np.asarray(image, dtype=np.float32) / 255.0
        if grey.mean() > 0.5:  # a light background: dark ink on paper, the data set is light ink on dark
            grey = 1.0 - grey
        return torch.from_numpy(grey).unsqueeze(0)

    def _check_array(self, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if array.size != SIDE * SIDE or array.shape not in ((64,), (8, 8), (1, 8, 8)):
            raise InvalidInput(f"expected 64 intensities shaped [8, 8], [1, 8, 8] or [64]; got shape "
                               f"{list(array.shape)}")
        if array.min() < 0.0 or array.max() > 1.0:
            raise InvalidInput(f"expected intensities in [0, 1]; got values from {array.min():g} to "
                               f"{array.max():g}")
        return array.reshape(1, SIDE, SIDE).astype(np.float32)

    def encode(self, row: torch.Tensor) -> dict[str, Any]:
        probabilities = torch.softmax(row, dim=0)
        top = torch.topk(probabilities, k=min(self.top_k, len(self.labels)))
        return {
            "label": self.labels[int(top.indices[0])],
            "probabilities": {self.labels[int(i)]: round(float(p), 6) for p, i in
                              zip(top.values, top.indices, strict=True)},
        }
