"""An image segmenter: torchvision's LR-ASPP MobileNetV3-Large for the 21 Pascal VOC classes.

The weights are random (fixed seed, backbone included): nothing is downloaded, so the archive exercises the
serving path (decoding, batching, the class map's encoding, throughput) with a real architecture, not the
quality of its maps; the batch-norm statistics are measured on views of the sample photos
(`calibrate_batchnorm`), so the maps vary with the image. Labels are the VOC category names torchvision ships in code.

torchvision's segmenters return a dict ({"out": logits[, "aux": ...]}); `OutTensor` exports only `out`, so the
module traces strictly and every backend sees one [N, classes, H, W] tensor. The export is fp32 TorchScript,
checked against eager fp32 to 1e-5. TorchServe's stock `image_segmenter` reads `output["out"]` and gets a
dict-returning wrapper of this same file (loadtest/bench.py, `stock_model_file`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from export.models import resnet
from export.spec import ModelSpec, PreparedModel

SEED = 0
#: the square the handler scales every image to (config/models/segmenter.yaml `resize`, `crop: null`): the pixel
#: count of the stock handler's 224 crop, so the two do the same model work per image
SIDE = 224
ARCHITECTURE = "lraspp_mobilenet_v3_large"
#: held-out views each worker checks the variant it would serve on (handlers/accuracy.py): the share of their
#: pixels whose class is fp32's must stay at or above the minimum
HELDOUT_VIEWS = 16
MIN_PIXEL_AGREEMENT = 0.98


class OutTensor(torch.nn.Module):
    """A torchvision segmenter returning its `out` logits as a tensor (the dict it returns does not trace strictly)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.model(x)
        logits: torch.Tensor = output["out"] if isinstance(output, dict) else output
        return logits


def voc_labels() -> list[str]:
    from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights

    categories: list[str] = list(LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1.meta["categories"])
    return categories


def segmenter_tensor(data: bytes, side: int = SIDE) -> torch.Tensor:
    """The handler's preprocessing of one image file: scaled to side x side, ImageNet mean/std."""
    from handlers.images import ImagePreprocessor

    return ImagePreprocessor(resize=side, crop=None).tensor(data)


def prepare_segmenter(model: torch.nn.Module, labels: list[str], examples: list[bytes] | None = None,
                      side: int = SIDE) -> PreparedModel:
    """Any segmenter (a [N, 3, side, side] ImageNet-normalised batch in, [N, classes, side, side] logits or a dict
    with "out" out) wrapped to return the logits, with the example photo(s) as examples.json (their size is the
    answer's width and height), noise for the parity check and held-out views for the accuracy gate."""
    from handlers.segmentation import original_size

    module = OutTensor(model.eval()).eval()
    photos = examples or [resnet.jpeg(resnet.sample_photos()[resnet.EXAMPLE_PHOTO])]
    real = segmenter_tensor(photos[0], side).unsqueeze(0)
    noise = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(SEED))
    sources = resnet.view_sources(examples)
    cases = []
    for photo in photos:
        width, height = original_size(photo)
        cases.append({"input": {"data": base64.b64encode(photo).decode()},
                      "expect": {"width": width, "height": height}})
    return PreparedModel(
        module=module,
        example_inputs=(real,),
        check_inputs=(torch.cat([real, noise]),),
        labels=labels,
        metrics={"parameters": float(sum(p.numel() for p in module.parameters()))},
        extra_files={"examples.json": json.dumps(cases, indent=1).encode()},
        heldout=[{"data": base64.b64encode(view).decode()} for view in
                 resnet.real_views(HELDOUT_VIEWS, seed=SEED + 6, max_side=side, sources=sources)],
        heldout_about=f"{HELDOUT_VIEWS} views (crops, scales, mirror images) of "
                      + ("scikit-learn's two sample photos" if sources is None else "the example images"),
    )


def build(architecture: str = ARCHITECTURE) -> PreparedModel:
    import torchvision

    torch.manual_seed(SEED)
    factory: Callable[..., torch.nn.Module] = getattr(torchvision.models.segmentation, architecture)
    # weights_backbone=None as well: its default would download ImageNet weights for the backbone
    model = factory(weights=None, weights_backbone=None, num_classes=21)
    return prepare_segmenter(calibrate_batchnorm(model), voc_labels())


def calibrate_batchnorm(model: torch.nn.Module, views: int = 16) -> torch.nn.Module:
    """Batch-norm statistics measured on views of the sample photos. With random weights and the default
    statistics (mean 0, variance 1) every pixel of every image gets the same class, which would make every check
    of the answers hollow; with measured ones the maps vary with the image, in blobs, like a trained model's."""
    batch = torch.stack([segmenter_tensor(view) for view in resnet.real_views(views, seed=SEED + 5)])
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for start in range(0, len(batch), 8):
            chunk = batch[start : start + 8]
            model(chunk)
    return model.eval()


def segmenter_spec(name: str, factory: Callable[[], PreparedModel], *, description: str,
                   revision: int = 1, **extra: Any) -> ModelSpec:
    """The declaration of an image segmenter served by handlers/segmentation_handler.py: fp32 TorchScript, which
    each worker may run cast to bf16/fp16 where that is native and keeps the class maps within the pixel-agreement
    bound on the held-out views (no int8/ONNX exports: the archive builds in seconds on 2 cores)."""
    return ModelSpec(name=name, revision=revision, factory=factory, handler="handlers/segmentation_handler.py",
                     description=description, accuracy=("pixel_agreement", MIN_PIXEL_AGREEMENT), **extra)


SEGMENTER = segmenter_spec(
    "segmenter", partial(build, ARCHITECTURE),
    description="torchvision LR-ASPP MobileNetV3-Large, random weights, Pascal VOC labels (serving-path model)")

SPECS = (SEGMENTER,)


def config_for(name: str) -> str:
    """config/models/NAME.yaml for a segmenter `tsforge new` declares: the shipped segmenter's settings."""
    from export.registry import ROOT

    shipped = (ROOT / "config" / "models" / "segmenter.yaml").read_text().splitlines(keepends=True)
    body = "".join(shipped[next(n for n, line in enumerate(shipped) if not line.startswith("#")):])
    return (f"# TorchServe model-config.yaml for {name} (packaged as model-config.yaml), written by `tsforge new`\n"
            f"# from the segmenter example's settings. `make tune MODEL={name}` measures workers x batch x delay.\n"
            + body)


class DictOut(torch.nn.Module):
    """A segmenter's TorchScript as TorchServe's stock `image_segmenter` needs it: its postprocess reads
    `output["out"]`, so the logits go back under "out", as torchvision's eager segmenters return them."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.inner(x)}


def stock_model_file(torchscript: str, out: str) -> None:
    """Write `out`: the exported TorchScript file (same program, same weights) scripted inside `DictOut`."""
    inner = torch.jit.load(torchscript, map_location="cpu")  # type: ignore[no-untyped-call]
    scripted = torch.jit.script(DictOut(inner).eval())  # type: ignore[no-untyped-call]
    scripted.save(out)  # type: ignore[no-untyped-call]


def eager_from_torchscript(path: str, architecture: str = ARCHITECTURE, num_classes: int = 21) -> torch.nn.Module:
    """The eager torchvision segmenter (in `OutTensor`, as exported) with the weights of an exported one: the
    in-process reference of the tests (the traced program's parameter names are OutTensor's)."""
    import torchvision

    program = torch.jit.load(path, map_location="cpu")  # type: ignore[no-untyped-call]
    model = OutTensor(torchvision.models.get_model(architecture, weights=None, weights_backbone=None,
                                                   num_classes=num_classes))
    model.load_state_dict(program.state_dict())
    return model.eval()
