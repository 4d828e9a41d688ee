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
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from export.spec import ModelSpec, PreparedModel

SEED = 0
SIDE = 224
EXAMPLE_PHOTO = "china.jpg"


def imagenet_labels() -> list[str]:
    from torchvision.models import ResNet18_Weights

    categories: list[str] = list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    return categories


def sample_photos() -> dict[str, np.ndarray]:
    """scikit-learn's bundled photos (china.jpg, flower.jpg) as HxWx3 uint8 arrays."""
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
    )


def spec(architecture: str, title: str) -> ModelSpec:
    return ModelSpec(
        name=architecture,
        revision=1,
        factory=partial(build, architecture),
        handler="handlers/image_handler.py",
        description=f"torchvision {title}, random weights, ImageNet labels (serving-path and throughput model)",
    )


RESNET18 = spec("resnet18", "ResNet-18")
RESNET50 = spec("resnet50", "ResNet-50")

SPECS = (RESNET18, RESNET50)
