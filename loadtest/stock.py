"""TorchServe's stock handler for each tsforge handler: the one place that says which baseline a model's `stock`
rows ran (loadtest/bench.py serves it, loadtest/render.py names it, loadtest/gpu_bench.py serves the image one)."""

from __future__ import annotations

from pathlib import Path

# TorchServe's stock handler for each tsforge handler, where one exists.
STOCK_HANDLERS = {"image_handler.py": "image_classifier", "segmentation_handler.py": "image_segmenter",
                  # stock text_classifier needs torchtext (none for torch 2.x) and a pickled vocabulary: what users
                  # ran for Hugging Face classifiers is pytorch/serve's example handler, as loadtest/ reproduces it
                  "text_classification_handler.py": "loadtest/stock_text_classifier.py",
                  # object_detector on the same weights, eager: loadtest/stock_detector_model.py says why
                  "detection_handler.py": "object_detector"}
#: how the docs name a stock handler that is not one of TorchServe's built-in names
STOCK_NAMES = {
    "loadtest/stock_text_classifier.py": "(the text classifier example, `loadtest/stock_text_classifier.py`)"}


def stock_handler(model: str) -> str | None:
    """The stock handler `make bench` serves for MODEL (a TorchServe handler name or a file), None without one."""
    from export.registry import get

    return STOCK_HANDLERS.get(Path(get(model).handler).name)


def declared_stock_handler(model: str | None) -> str | None:
    """As `stock_handler`, and None for a model this checkout does not declare (a report from elsewhere)."""
    from export.registry import MODELS, discover

    spec = MODELS.get(model or "") or discover().get(model or "")
    return None if spec is None else STOCK_HANDLERS.get(Path(spec.handler).name)


def stock_name(handler: str) -> str:
    """A stock handler as the docs name it: `image_classifier`, or what the file is."""
    return STOCK_NAMES.get(handler, f"`{handler}`")
