"""An object detector: torchvision's Faster R-CNN MobileNetV3-Large 320 FPN for COCO's 91 category ids.

The weights are random (fixed seed, backbone included): nothing is downloaded, so the archive exercises the
serving path (decoding, batching, box scaling, throughput) with a real architecture, not the quality of its boxes.
Two changes make its answers worth comparing (`liven`): as shipped, random weights give every box of every image the
same score (1/88: the features reaching the box head are constant), so the order of the boxes is arbitrary and any
check would be hollow. The backbone's batch-norm statistics are measured on views of the sample photos (the
segmenter's `calibrate_batchnorm`), so the features vary with the image, and the classifier's logits are scaled by
`SHARPEN`, so scores spread from ~0.01 to ~0.8: at the config's 0.5 threshold (TorchServe's stock handler's too)
both sample photos give detections. Labels are the COCO names torchvision ships in code ("__background__" and
"N/A" fill the unused ids).

Detectors have data-dependent control flow (proposals, NMS): the export is `torch.jit.script` (`script=True`),
checked against eager on images already at the model's size. fp32 TorchScript only: the int8/ONNX/AOTInductor
runners carry tensors, not the detector's list of dicts, and the archive builds in seconds.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from export.models import resnet
from export.spec import ModelSpec, PreparedModel

SEED = 0
ARCHITECTURE = "fasterrcnn_mobilenet_v3_large_320_fpn"
HANDLER = "handlers/detection_handler.py"
#: the factor on the random classifier's logits: scores spread over (0, 1) instead of all being 1/88
SHARPEN = 12.0
#: parity of the scripted program with eager, in box pixels and scores (the same float32 kernels: ~0)
TOLERANCE = 1e-3


def coco_labels() -> list[str]:
    from torchvision.models.detection import FasterRCNN_MobileNet_V3_Large_320_FPN_Weights

    categories: list[str] = list(FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1.meta["categories"])
    return categories


def detector_input(data: bytes, min_size: int = 320, max_size: int = 640) -> torch.Tensor:
    """One image file as the handler hands it to the model: [3, h, w] in [0, 1] at the model's size."""
    from handlers.detection_handler import DetectionHandler

    handler = DetectionHandler.__new__(DetectionHandler)
    handler.min_size, handler.max_size, handler.max_pixels = min_size, max_size, 40_000_000
    pixels: torch.Tensor = handler.decode(data).pixels
    return pixels


def transform_sizes(model: torch.nn.Module) -> tuple[int, int]:
    """(min_size, max_size) of a torchvision detector's transform (320, 640 for the shipped one)."""
    transform = getattr(model, "transform", None)
    min_size = getattr(transform, "min_size", (800,))
    return int(min_size[-1] if isinstance(min_size, (tuple, list)) else min_size), \
        int(getattr(transform, "max_size", 1333))


def eager_from_torchscript(path: str, architecture: str = ARCHITECTURE) -> torch.nn.Module:
    """The eager torchvision detector with the weights of an exported (scripted) one: the in-process reference of
    the tests, and the state dict TorchServe's stock handler loads (parameter names are the same in both)."""
    import torchvision.models.detection as detection  # also registers the ops the program calls (nms, roi_align)

    program = torch.jit.load(path, map_location="cpu")  # type: ignore[no-untyped-call]
    model: torch.nn.Module = getattr(detection, architecture)(weights=None, weights_backbone=None)
    model.load_state_dict(program.state_dict())
    return model.eval()


def detections_of(output: Any) -> list[dict[str, torch.Tensor]]:
    """A detector's per-image dicts: eager torchvision returns the list, a scripted one (losses, the list)."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], list):
        output = output[1]
    if not isinstance(output, list) or not all(isinstance(d, dict) and {"boxes", "labels", "scores"} <= set(d)
                                               for d in output):
        raise ValueError(f"expected a list of {{'boxes', 'labels', 'scores'}} dicts, got {type(output).__name__}")
    return output


def class_count(model: torch.nn.Module) -> int | None:
    """The classes a torchvision detector scores (Faster R-CNN's box predictor, RetinaNet's and SSD's heads)."""
    score = getattr(getattr(getattr(model, "roi_heads", None), "box_predictor", None), "cls_score", None)
    if isinstance(score, torch.nn.Linear):
        return int(score.out_features)
    count = getattr(getattr(getattr(model, "head", None), "classification_head", None), "num_classes", None)
    return int(count) if isinstance(count, int) else None


def detector_labels(model: torch.nn.Module, coco: bool, given: list[str] | None) -> list[str]:
    """`given` (checked against the model's classes where known), COCO's for a torchvision detector as shipped,
    else "0".."N-1"."""
    classes = class_count(model)
    if given is not None:
        if classes is not None and len(given) != classes:
            from export.sources import NewError

            raise NewError(f"the labels file has {len(given)} labels; the detector scores {classes} classes")
        return given
    if coco and classes in (None, len(coco_labels())):
        return coco_labels()
    return [str(i) for i in range(classes or len(coco_labels()))]


def liven(model: torch.nn.Module) -> torch.nn.Module:
    """Batch-norm statistics from the sample photos and a sharper classifier (see the module's docstring)."""
    from export.models.segmentation import calibrate_batchnorm

    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        calibrate_batchnorm(backbone)
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    score = getattr(predictor, "cls_score", None)
    if isinstance(score, torch.nn.Linear):
        with torch.no_grad():
            score.weight.mul_(SHARPEN)
            score.bias.mul_(SHARPEN)
    return model.eval()


def prepare_detector(model: torch.nn.Module, labels: list[str], examples: list[bytes] | None = None,
                     ) -> PreparedModel:
    """Any torchvision-style detector (a list of [3, H, W] images in [0, 1] in; a list of {"boxes", "labels",
    "scores"} out) with the example photos (examples.json) and the images its scripted program is checked on."""
    model = model.eval()
    photos = examples or [resnet.jpeg(photo) for photo in resnet.sample_photos().values()]
    min_size, max_size = transform_sizes(model)
    images = [detector_input(photo, min_size, max_size) for photo in photos]
    views = [detector_input(view, min_size, max_size) for view in resnet.real_views(4, seed=SEED + 3)]
    with torch.inference_mode():
        found = [len(d["boxes"]) for d in detections_of(model(images))]
    cases = [{"input": {"data": base64.b64encode(photo).decode()}, "expect": {"candidates": count}}
             for photo, count in zip(photos, found, strict=True)]
    return PreparedModel(
        module=model,
        example_inputs=(images,),  # type: ignore[arg-type]  # the detector takes one list of images
        check_inputs=([*images, *views],),  # type: ignore[arg-type]
        labels=labels,
        metrics={"parameters": float(sum(p.numel() for p in model.parameters()))},
        extra_files={"examples.json": json.dumps(cases, indent=1).encode()},
    )


def build(architecture: str = ARCHITECTURE) -> PreparedModel:
    import torchvision

    torch.manual_seed(SEED)
    factory: Callable[..., torch.nn.Module] = getattr(torchvision.models.detection, architecture)
    # weights_backbone=None as well: its default would download ImageNet weights for the backbone
    model = factory(weights=None, weights_backbone=None)
    return prepare_detector(liven(model), coco_labels())


def detector_spec(name: str, factory: Callable[[], PreparedModel], *, description: str, revision: int = 1,
                  **extra: Any) -> ModelSpec:
    """The declaration of a detector served by handlers/detection_handler.py: scripted, fp32 TorchScript only."""
    return ModelSpec(name=name, revision=revision, factory=factory, handler=HANDLER, description=description,
                     script=True, tolerance=TOLERANCE, **extra)


DETECTOR = detector_spec(
    "detector", partial(build, ARCHITECTURE),
    description="torchvision Faster R-CNN MobileNetV3-Large 320 FPN, random weights (batch-norm statistics from the "
                "sample photos), COCO labels (serving-path model)")

SPECS = (DETECTOR,)


def config_for(name: str, min_size: int, max_size: int) -> str:
    """config/models/NAME.yaml for a detector `tsforge new` declares: the shipped detector's settings, with the
    model's own transform sizes."""
    from export.registry import ROOT

    shipped = (ROOT / "config" / "models" / "detector.yaml").read_text().splitlines(keepends=True)
    body = "".join(shipped[next(n for n, line in enumerate(shipped) if not line.startswith("#")):])
    body = re.sub(r"(?m)^(  min_size: )\d+", rf"\g<1>{min_size}", body)
    body = re.sub(r"(?m)^(  max_size: )\d+", rf"\g<1>{max_size}", body)
    return (f"# TorchServe model-config.yaml for {name} (packaged as model-config.yaml), written by `tsforge new`\n"
            f"# from the detector example's settings. `make tune MODEL={name}` measures workers x batch x delay.\n"
            + body)


def new_files(name: str, module: torch.nn.Module, coco: bool, labels: list[str] | None, variants: tuple[str, ...],
              photos: dict[str, bytes], examples: Path) -> tuple[str, dict[Path, bytes]]:
    """object-detection for `tsforge new`: the model checked on an example photo (its output, labels, and that
    torch.jit.script compiles it), its config and the example photos for `examples` (examples/NAME/)."""
    from export.sources import NewError, run_once, short_message

    if variants:
        raise NewError("object-detection exports scripted fp32 TorchScript only; expected no --variants (or none)")
    min_size, max_size = transform_sizes(module)
    image = detector_input(next(iter(photos.values())), min_size, max_size)
    expected = "object-detection expects a torchvision-style detector taking a list of [3, H, W] images in [0, 1]"
    output = run_once(module, [image], expected)  # type: ignore[arg-type]  # a detector takes a list
    try:
        detections_of(output)
    except ValueError as exc:
        raise NewError(f"{expected} and returning one dict per image; {exc}") from None
    detector_labels(module, coco, labels)
    if not isinstance(module, torch.jit.ScriptModule):
        try:
            torch.jit.script(module)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise NewError(f"the detector cannot be compiled by torch.jit.script (expected a module TorchScript "
                           f"compiles, as torchvision's detectors; detectors are scripted, not traced): "
                           f"{short_message(exc)}") from exc
    return config_for(name, min_size, max_size), {examples / photo: data for photo, data in photos.items()}
