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
from tsforge import extras

SEED = 0
SIDE = 224
EXAMPLE_PHOTO = "china.jpg"
PHOTO_FILES = ("china.jpg", "flower.jpg")
PHOTOS_ENV = "TSFORGE_SAMPLE_PHOTOS"


def imagenet_labels() -> list[str]:
    from torchvision.models import ResNet18_Weights

    categories: list[str] = list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    return categories


#: the subject of the message when scikit-learn (the `examples` extra) is missing
SAMPLE_PHOTOS_PURPOSE = f"scikit-learn's sample photos ({', '.join(PHOTO_FILES)}; or a folder of them in {PHOTOS_ENV})"


def sample_photos_available() -> bool:
    return bool(os.environ.get(PHOTOS_ENV)) or extras.available("sklearn")


def sample_photos() -> dict[str, np.ndarray]:
    """scikit-learn's bundled photos (china.jpg, flower.jpg) as HxWx3 uint8 arrays.

    Where scikit-learn is missing (a GPU host without a package index), `TSFORGE_SAMPLE_PHOTOS` names a
    folder holding the same two JPEG files, read as scikit-learn reads them (Pillow, RGB). Neither: MissingExtra,
    one line naming the `examples` extra."""
    folder = os.environ.get(PHOTOS_ENV)
    if folder:
        from PIL import Image

        return {name: np.asarray(Image.open(Path(folder) / name).convert("RGB")) for name in PHOTO_FILES}
    datasets = extras.require("sklearn.datasets", "examples", SAMPLE_PHOTOS_PURPOSE)
    bundle = datasets.load_sample_images()
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


def real_views(count: int, seed: int, *, max_side: int | None = None,
               sources: list[np.ndarray] | None = None) -> list[bytes]:
    """`count` JPEG views of the two sample photos, or of `sources` (random crops, scales and mirror images): real
    image statistics for calibration and accuracy checks, with no data set to download. `max_side` bounds the
    shorter side (the handler resizes to 256 anyway), to keep the views an archive carries small."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in (sample_photos().values() if sources is None else sources)]
    views = []
    for n in range(count):
        photo = photos[n % len(photos)]
        scale = rng.uniform(0.35, 1.0)
        w, h = int(photo.width * scale), int(photo.height * scale)
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        view = photo.crop((left, top, left + w, top + h))
        view = ImageOps.mirror(view) if n % 4 >= 2 else view
        if max_side and min(view.size) > max_side:
            view.thumbnail((max_side * view.width // min(view.size), max_side * view.height // min(view.size)))
        views.append(jpeg(np.asarray(view)))
    return views


def real_inputs(count: int, seed: int, sources: list[np.ndarray] | None = None) -> torch.Tensor:
    """`count` preprocessed views of the sample photos (or `sources`: `real_views`), as the model takes them."""
    return torch.stack([imagenet_tensor(view) for view in real_views(count, seed, sources=sources)])


#: held-out views each worker checks its variant on (handlers/accuracy.py), apart from calibration's and export's
HELDOUT_VIEWS = 64


def quality(fp32: Callable[..., torch.Tensor], variant: Callable[..., torch.Tensor],
            sources: list[np.ndarray] | None = None) -> dict[str, float]:
    """Top-1 agreement and the largest logit difference against fp32 on 32 held-out views of real photos."""
    held_out = real_inputs(32, seed=SEED + 1, sources=sources)
    with torch.inference_mode():
        expected, actual = fp32(held_out), variant(held_out)
    return {"top1_agreement": round(float((expected.argmax(1) == actual.argmax(1)).float().mean()), 4),
            "max_logit_diff": round(float((expected - actual).abs().max()), 4),
            "logit_range": round(float(expected.max() - expected.min()), 4)}


MIN_TOP1_AGREEMENT = 0.95


def int8_bound(metrics: dict[str, float]) -> tuple[bool, str]:
    return (metrics["top1_agreement"] >= MIN_TOP1_AGREEMENT,
            f"top-1 agreement with fp32 >= {MIN_TOP1_AGREEMENT} on held-out views of real photos")


def build(architecture: str) -> PreparedModel:
    import torchvision

    torch.manual_seed(SEED)
    factory: Callable[..., torch.nn.Module] = getattr(torchvision.models, architecture)
    return prepare_classifier(factory(weights=None, num_classes=1000), imagenet_labels())


def prepare_classifier(model: torch.nn.Module, labels: list[str], examples: list[bytes] | None = None,
                       ) -> PreparedModel:
    """Any image classifier (a [N, 3, 224, 224] ImageNet-normalised batch in, [N, classes] logits out) with what
    the image handler's exports and checks need: the example photo(s), real-photo calibration, held-out views.
    `examples` (image files) become examples.json with the fp32 model's top-1 label; the first is traced."""
    model = model.eval()
    photos = examples or [jpeg(sample_photos()[EXAMPLE_PHOTO])]
    sources = view_sources(examples)
    of = "scikit-learn's two sample photos" if sources is None else f"the {len(photos)} example images"
    real = imagenet_tensor(photos[0]).unsqueeze(0)
    noise = torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        top1 = [int(model(imagenet_tensor(photo).unsqueeze(0)).argmax(1)) for photo in photos]
    example = [{"input": {"data": base64.b64encode(photo).decode()}, "expect": {"label": labels[top]}}
               for photo, top in zip(photos, top1, strict=True)]
    return PreparedModel(
        module=model,
        example_inputs=(real,),
        check_inputs=(torch.cat([real, noise]),),
        labels=labels,
        metrics={"parameters": float(sum(p.numel() for p in model.parameters()))},
        extra_files={"examples.json": json.dumps(example, indent=1).encode()},
        calibration=(real_inputs(32, seed=SEED, sources=sources),),
        quality=partial(quality, sources=sources),
        heldout=[{"data": base64.b64encode(view).decode()} for view in
                 real_views(HELDOUT_VIEWS, seed=SEED + 2, max_side=SIDE + 32, sources=sources)],
        heldout_about=f"{HELDOUT_VIEWS} views (crops, scales, mirror images) of {of}",
    )


def view_sources(examples: list[bytes] | None) -> list[np.ndarray] | None:
    """What calibration and the held-out checks take views of: the sample photos (None) where they can be had, else
    the example images the user gave (a tree without the `examples` extra)."""
    if examples is None or sample_photos_available():
        return None
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in examples]


def classifier_spec(name: str, factory: Callable[[], PreparedModel], *, description: str,
                    variants: tuple[str, ...], revision: int = 1) -> ModelSpec:
    """The declaration of an image classifier served by handlers/image_handler.py, with the ResNets' bounds."""
    return ModelSpec(
        name=name,
        revision=revision,
        factory=factory,
        handler="handlers/image_handler.py",
        description=description,
        variants=variants,
        int8_bound=int8_bound,
        accuracy=("top1_agreement", MIN_TOP1_AGREEMENT),
    )


def spec(architecture: str, title: str, variants: tuple[str, ...]) -> ModelSpec:
    return classifier_spec(
        architecture, partial(build, architecture),
        description=f"torchvision {title}, random weights, ImageNet labels (serving-path and throughput model)",
        variants=variants,
    )


RESNET18 = spec("resnet18", "ResNet-18", ("int8", "onnx", "onnx-int8", "aotinductor"))
RESNET50 = spec("resnet50", "ResNet-50", ("int8", "onnx"))

SPECS = (RESNET18, RESNET50)
