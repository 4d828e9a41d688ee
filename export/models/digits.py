"""The built-in default model: a small CNN trained on scikit-learn's bundled 8x8 digits.

Inputs are 1x8x8 ink intensities in [0, 1] (0 = background). The data set's 0..16 values are
quantised to 8-bit grey levels first, so a PNG of an image and its JSON array reach the model as the
same tensor.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from export.spec import ModelSpec, PreparedModel
from tsforge import extras

SEED = 0
TEST_FRACTION = 0.2
EPOCHS = 40
SPLIT_ENV = "TSFORGE_DIGITS_SPLIT"


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(x))
        return out


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed train/test split as 8-bit grey images (N, 8, 8) uint8 and integer labels.

    Where scikit-learn is missing (the GPU host of `make test-gpu`), `TSFORGE_DIGITS_SPLIT` names an .npz file of
    this very split that `save_split` wrote (plain arrays: read without pickle)."""
    carried = os.environ.get(SPLIT_ENV)
    if carried:
        with np.load(carried, allow_pickle=False) as split:
            return split["x_train"], split["y_train"], split["x_test"], split["y_test"]
    datasets = extras.require("sklearn.datasets", "examples", "the digits example (scikit-learn's 8x8 digits)")
    from sklearn.model_selection import train_test_split

    digits = datasets.load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=TEST_FRACTION, random_state=SEED, stratify=digits.target
    )
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def save_split(path: str) -> None:
    """The split as a file for a host without scikit-learn (read by `load_split` through TSFORGE_DIGITS_SPLIT)."""
    x_train, y_train, x_test, y_test = load_split()
    np.savez_compressed(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().div_(255.0).unsqueeze(1)


def train() -> PreparedModel:
    x_train, y_train, x_test, y_test = load_split()
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    xs, ys = to_tensor(x_train), torch.from_numpy(y_train)
    for _ in range(EPOCHS):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), 64):
            idx = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    model.eval()
    held_out = to_tensor(x_test)
    with torch.inference_mode():
        accuracy = (model(held_out).argmax(1).numpy() == y_test).mean().item()

    def quality(fp32: Callable[..., torch.Tensor], variant: Callable[..., torch.Tensor]) -> dict[str, float]:
        """Held-out accuracy of a variant against fp32's, both as served."""
        with torch.inference_mode():
            ours, theirs = (float((run(held_out).argmax(1).numpy() == y_test).mean()) for run in (variant, fp32))
        return {"accuracy": round(ours, 4), "fp32_accuracy": round(theirs, 4),
                "accuracy_drop_pp": round((theirs - ours) * 100, 2)}

    return PreparedModel(
        extra_files={"examples.json": examples(x_test[:4], y_test[:4])},
        module=model,
        example_inputs=(held_out[:8],),
        check_inputs=(held_out,),
        labels=[str(d) for d in range(10)],
        metrics={"test_accuracy": round(accuracy, 4), "test_images": float(len(y_test))},
        calibration=(xs[:512],),
        quality=quality,
        heldout=[{"data": base64.b64encode(png(img)).decode()} for img in x_test],
        heldout_about=f"the {len(x_test)} held-out digits of the fixed split, as PNG",
    )


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def examples(images: np.ndarray, labels: np.ndarray) -> bytes:
    """Example requests stored in the archive (for `make predict` and deploy smoke tests)."""
    cases = [{"input": {"data": base64.b64encode(png(img)).decode()}, "expect": {"label": str(int(y))}}
             for img, y in zip(images, labels, strict=True)]
    return json.dumps(cases, indent=1).encode()


MAX_ACCURACY_DROP_PP = 0.5
#: the share of held-out digits on which a served variant must give fp32's label, on the serving machine
MIN_TOP1_AGREEMENT = 0.99


def int8_bound(metrics: dict[str, float]) -> tuple[bool, str]:
    return (metrics["accuracy_drop_pp"] <= MAX_ACCURACY_DROP_PP,
            f"held-out accuracy at most {MAX_ACCURACY_DROP_PP} percentage points below fp32's")


SPEC = ModelSpec(
    name="digits",
    revision=1,
    factory=train,
    handler="handlers/digits_handler.py",
    description="CNN on scikit-learn's 8x8 digits (the default model)",
    variants=("int8", "onnx", "onnx-int8", "aotinductor"),
    int8_bound=int8_bound,
    accuracy=("top1_agreement", MIN_TOP1_AGREEMENT),
)
