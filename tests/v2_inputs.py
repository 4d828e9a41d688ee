"""Real inputs for every example model as v2 tensors, shared by tests/test_front.py and the subprocess that runs
the `kserve` package's clients (which must not import tritonclient: both register the `inference.*` protos)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


def png(image: np.ndarray[Any, Any]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def inputs_for(model: str) -> tuple[str, str, np.ndarray[Any, Any]]:
    """(input name, datatype, batch of 2-3 real inputs) for each example model."""
    if model == "digits_tensor":
        from sklearn.datasets import load_digits

        return "x", "FP32", (load_digits().images[:3, None] / 16.0).astype(np.float32)
    if model in ("digits", "digits_image"):
        from sklearn.datasets import load_digits

        images = [png(np.kron(image * 16, np.ones((4, 4))).clip(0, 255)) for image in load_digits().images[:3]]
        return "image", "BYTES", np.array(images, dtype=np.object_)
    if model == "resnet18":
        from export.models.resnet import jpeg, sample_photos

        return "image", "BYTES", np.array([jpeg(p) for p in sample_photos().values()], dtype=np.object_)
    texts = ["A man is playing a guitar.", "The weather is lovely today."]
    return "text", "BYTES", np.array([t.encode() for t in texts], dtype=np.object_)


def as_json_strings(model: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """BYTES as the JSON form of the protocol carries them: UTF-8 strings, so base64 for images and plain text
    for the text model (KServe's REST server refuses raw binary BYTES that are not UTF-8)."""
    import base64

    if model == "minilm":
        return np.array([x.decode() for x in array], dtype=np.object_)
    return np.array([base64.b64encode(x).decode() for x in array], dtype=np.object_)
