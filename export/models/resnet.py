"""ResNet-18 and ResNet-50 image classifiers (torchvision architectures) for ImageNet's 1000 classes.

The weights are random (fixed seed): nothing is downloaded, so these archives exercise the serving path
(decoding, batching, precision, throughput) with real architectures, not prediction quality. Swap in
trained weights by loading a state dict in `build` before export. Labels are the ImageNet category
names that torchvision ships in code.

The export is fp32 TorchScript, checked against eager fp32 to 1e-5. Precision (bf16/fp16) and the
channels-last memory format are applied by the handler at load time, before it freezes the module
(see handlers/image_handler.py): a frozen module's weights are constants that `.to(dtype)` no longer
converts, so freezing here would pin the precision into the file.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from export.spec import ModelSpec, PreparedModel

SEED = 0
SIDE = 224
EXAMPLE_PHOTO = "china.jpg"
PHOTO_FILES = ("china.jpg", "flower.jpg")
PHOTOS_ENV = "TSFORGE_SAMPLE_PHOTOS"


def imagenet_labels() -> list[str]:
    from torchvision.models import ResNet18_Weights

    categories: list[str] = list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    return categories


def sample_photos() -> dict[str, np.ndarray]:
    """scikit-learn's bundled photos (china.jpg, flower.jpg) as HxWx3 uint8 arrays.

    Where scikit-learn is missing (a GPU host without a package index), `TSFORGE_SAMPLE_PHOTOS` names a
    folder holding the same two JPEG files, read as scikit-learn reads them (Pillow, RGB)."""
    folder = os.environ.get(PHOTOS_ENV)
    if folder:
        from PIL import Image

        return {name: np.asarray(Image.open(Path(folder) / name).convert("RGB")) for name in PHOTO_FILES}
    from sklearn.datasets import load_sample_images

    bundle = load_sample_images()
    return {name.rsplit("/", 1)[-1]: image for name, image in zip(bundle.filenames, bundle.images, strict=True)}


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def imagenet_tensor(data: bytes) -> torch.Tensor:
    """The handler's default preprocessing (resize 256, crop 224, ImageNet mean/std) of one image file."""
    from handlers.images import ImagePreprocessor

    return ImagePreprocessor().tensor(data)


def real_inputs(count: int, seed: int) -> torch.Tensor:
    """`count` preprocessed views of the two sample photos (random crops, scales and mirror images): real
    image statistics for calibration and accuracy checks, with no data set to download."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in sample_photos().values()]
    views = []
    for n in range(count):
        photo = photos[n % len(photos)]
        scale = rng.uniform(0.35, 1.0)
        w, h = int(photo.width * scale), int(photo.height * scale)
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        view = photo.crop((left, top, left + w, top + h))
        views.append(imagenet_tensor(jpeg(np.asarray(ImageOps.mirror(view) if n % 4 >= 2 else view))))
    return torch.stack(views)


def quality(fp32: Callable[..., torch.Tensor], variant: Callable[..., torch.Tensor]) -> dict[str, float]:
    """Top-1 agreement and the largest logit difference against fp32 on 32 held-out views of real photos."""
    held_out = real_inputs(32, seed=SEED + 1)
    with torch.inference_mode():
        expected, actual = fp32(held_out), variant(held_out)
    return {"top1_agreement": round(float((expected.argmax(1) == actual.argmax(1)).float().mean()), 4),
            "max_logit_diff": round(float((expected - actual).abs().max()), 4),
            "logit_range": round(float(expected.max() - expected.min()), 4)}


MIN_TOP1_AGREEMENT = 0.9


def int8_bound(metrics: dict[str, float]) -> tuple[bool, str]:
    return (metrics["top1_agreement"] >= MIN_TOP1_AGREEMENT,
            f"top-1 agreement with fp32 >= {MIN_TOP1_AGREEMENT} on held-out views of real photos")


def build(architecture: str) -> PreparedModel:
    import torchvision

    torch.manual_seed(SEED)
    factory: Callable[..., torch.nn.Module] = getattr(torchvision.models, architecture)
    model = factory(weights=None, num_classes=1000).eval()
    photo = jpeg(sample_photos()[EXAMPLE_PHOTO])
    real = imagenet_tensor(photo).unsqueeze(0)
    noise = torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(SEED))
    labels = imagenet_labels()
    with torch.inference_mode():
        top1 = int(model(real).argmax(1))
    example = [{"input": {"data": base64.b64encode(photo).decode()}, "expect": {"label": labels[top1]}}]
    return PreparedModel(
        module=model,
        example_inputs=(real,),
        check_inputs=(torch.cat([real, noise]),),
        labels=labels,
        metrics={"parameters": float(sum(p.numel() for p in model.parameters()))},
        extra_files={"examples.json": json.dumps(example, indent=1).encode()},
        calibration=(real_inputs(32, seed=SEED),),
        quality=quality,
    )


def spec(architecture: str, title: str, variants: tuple[str, ...]) -> ModelSpec:
    return ModelSpec(
        name=architecture,
        revision=1,
        factory=partial(build, architecture),
        handler="handlers/image_handler.py",
        description=f"torchvision {title}, random weights, ImageNet labels (serving-path and throughput model)",
        variants=variants,
        int8_bound=int8_bound,
    )


RESNET18 = spec("resnet18", "ResNet-18", ("int8", "onnx", "onnx-int8", "aotinductor"))
RESNET50 = spec("resnet50", "ResNet-50", ("int8", "onnx"))

SPECS = (RESNET18, RESNET50)
