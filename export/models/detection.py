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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from export.failures import NewError, run_once, short_message
from export.models import resnet
from export.spec import ModelSpec, PreparedModel
from handlers.detection import detections_of

SEED = 0
ARCHITECTURE = "fasterrcnn_mobilenet_v3_large_320_fpn"
HANDLER = "handlers/detection_handler.py"
#: the factor on the random classifier's logits: scores spread over (0, 1) instead of all being 1/88
SHARPEN = 12.0
#: parity of the scripted program with eager, in box pixels and scores (the same float32 kernels: ~0)
TOLERANCE = 1e-3
#: held-out views each worker checks the variant it would serve on (handlers/accuracy.py): the detections' F1
#: against fp32's (same label, IoU >= 0.5), averaged over the views, must stay at or above the minimum
HELDOUT_VIEWS = 12
MIN_DETECTION_F1 = 0.95


def coco_labels() -> list[str]:
    from torchvision.models.detection import FasterRCNN_MobileNet_V3_Large_320_FPN_Weights

    categories: list[str] = list(FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1.meta["categories"])
    return categories


@dataclass(frozen=True)
class Sizes:
    """What a torchvision detector's transform scales images to: the shorter side to `min_size` unless the longer
    would pass `max_size`, or every image stretched to `fixed` (width, height; SSD's)."""

    min_size: int = 320
    max_size: int = 640
    fixed: tuple[int, int] | None = None

    @classmethod
    def of(cls, model: torch.nn.Module) -> Sizes:
        transform = getattr(model, "transform", None)
        min_size = getattr(transform, "min_size", (800,))
        fixed = getattr(transform, "fixed_size", None)
        return cls(int(min_size[-1] if isinstance(min_size, (tuple, list)) else min_size),
                   int(getattr(transform, "max_size", 1333)), None if fixed is None else (int(fixed[0]), int(fixed[1])))

    @property
    def shorter_side(self) -> int:
        return min(self.fixed) if self.fixed else self.min_size


def detector_input(data: bytes, sizes: Sizes = Sizes()) -> torch.Tensor:
    """One image file as the handler hands it to the model: [3, h, w] in [0, 1] at the model's size."""
    from handlers.detection_handler import DetectionHandler

    handler = DetectionHandler.__new__(DetectionHandler)
    handler.min_size, handler.max_size, handler.fixed_size = sizes.min_size, sizes.max_size, sizes.fixed
    handler.max_pixels = 40_000_000
    pixels: torch.Tensor = handler.decode(data).pixels
    return pixels


def eager_from_torchscript(path: str, architecture: str = ARCHITECTURE) -> torch.nn.Module:
    """The eager torchvision detector with the weights of an exported (scripted) one: the in-process reference of
    the tests, and the state dict TorchServe's stock handler loads (parameter names are the same in both)."""
    import torchvision.models.detection as detection  # also registers the ops the program calls (nms, roi_align)

    program = torch.jit.load(path, map_location="cpu")  # type: ignore[no-untyped-call]
    model: torch.nn.Module = getattr(detection, architecture)(weights=None, weights_backbone=None)
    model.load_state_dict(program.state_dict())
    return model.eval()


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
            raise NewError(f"the labels file has {len(given)} labels; the detector scores {classes} classes")
        return given
    if coco and classes in (None, len(coco_labels())):
        return coco_labels()
    return [str(i) for i in range(classes or len(coco_labels()))]


def liven(model: torch.nn.Module) -> torch.nn.Module:
    """Batch-norm statistics from the sample photos and a sharper classifier (see the module's docstring); for a
    one-stage detector (RetinaNet, SSD), classification layers rescaled to `LOGIT_SPREAD` (`spread_logits`)."""
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
    else:
        spread_logits(model.eval())
    return model.eval()


#: the standard deviation of a one-stage detector's classification logits (over the sample views) after `liven`:
#: sigmoid heads (RetinaNet: "cls_logits", bias at the 0.01 prior) and softmax heads (SSD: "module_list"). With
#: random weights they vary by ~0.01 (every score ~1/91, or all under RetinaNet's 0.05 score_thresh: no boxes); at
#: these spreads the sample photos give tens (SSDlite) to ~150 (RetinaNet) boxes above the 0.5 threshold
LOGIT_SPREAD = {"sigmoid": 0.7, "softmax": 1.4}


def spread_logits(model: torch.nn.Module) -> None:
    """Scale the weights of a RetinaNet's or SSD's last classification convolutions so that their logits on views
    of the sample photos have the standard deviation `LOGIT_SPREAD` gives (no-op for other detectors)."""
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if isinstance(getattr(head, "cls_logits", None), torch.nn.Conv2d):
        layers, kind = [head.cls_logits], "sigmoid"  # type: ignore[union-attr]
    elif isinstance(getattr(head, "module_list", None), torch.nn.ModuleList):
        blocks = list(head.module_list)  # type: ignore[union-attr]
        layers = [block[-1] if isinstance(block, torch.nn.Sequential) else block for block in blocks]
        kind = "softmax"
    else:
        return
    if not all(isinstance(layer, torch.nn.Conv2d) for layer in layers):
        return
    outputs: dict[torch.nn.Module, list[torch.Tensor]] = {layer: [] for layer in layers}
    hooks = [layer.register_forward_hook(lambda module, _, output: outputs[module].append(output.flatten()))
             for layer in layers]
    sizes = Sizes.of(model)
    try:
        with torch.inference_mode():
            model([detector_input(view, sizes) for view in resnet.real_views(2, seed=SEED + 7)])
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        for layer in layers:
            spread = float(torch.cat(outputs[layer]).std())
            if spread > 0:
                layer.weight.mul_(LOGIT_SPREAD[kind] / spread)


def prepare_detector(model: torch.nn.Module, labels: list[str], examples: list[bytes] | None = None,
                     ) -> PreparedModel:
    """Any torchvision-style detector (a list of [3, H, W] images in [0, 1] in; a list of {"boxes", "labels",
    "scores"} out) with the example photos (examples.json) and the images its scripted program is checked on."""
    model = model.eval()
    photos = examples or [resnet.jpeg(photo) for photo in resnet.sample_photos().values()]
    sizes = Sizes.of(model)
    images = [detector_input(photo, sizes) for photo in photos]
    views = [detector_input(view, sizes) for view in resnet.real_views(4, seed=SEED + 3)]
    sources = resnet.view_sources(examples)
    heldout = resnet.real_views(HELDOUT_VIEWS, seed=SEED + 4, max_side=sizes.shorter_side, sources=sources)
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
        heldout=[{"data": base64.b64encode(view).decode()} for view in heldout],
        heldout_about=f"{HELDOUT_VIEWS} views (crops, scales, mirror images) of "
                      + ("scikit-learn's two sample photos" if sources is None else "the example images"),
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
                     script=True, tolerance=TOLERANCE, accuracy=("detection_f1", MIN_DETECTION_F1), **extra)


DETECTOR = detector_spec(
    "detector", partial(build, ARCHITECTURE),
    description="torchvision Faster R-CNN MobileNetV3-Large 320 FPN, random weights (batch-norm statistics from the "
                "sample photos), COCO labels (serving-path model)")

SPECS = (DETECTOR,)


def config_for(name: str, sizes: Sizes) -> str:
    """config/models/NAME.yaml for a detector `tsforge new` declares: the shipped detector's settings, with the
    model's own transform sizes."""
    from export.registry import ROOT

    shipped = (ROOT / "config" / "models" / "detector.yaml").read_text().splitlines(keepends=True)
    body = "".join(shipped[next(n for n, line in enumerate(shipped) if not line.startswith("#")):])
    body = re.sub(r"(?m)^(  min_size: )\d+", rf"\g<1>{sizes.min_size}", body)
    body = re.sub(r"(?m)^(  max_size: )\d+", rf"\g<1>{sizes.max_size}", body)
    if sizes.fixed:
        width, height = sizes.fixed
        body = re.sub(r"(?m)^(  max_size: .*\n)", rf"\g<1>  fixed_size: [{width}, {height}]   # the model stretches "
                      "every image to width x height; the handler does, and scales boxes back per axis\n", body)
    return (f"# TorchServe model-config.yaml for {name} (packaged as model-config.yaml), written by `tsforge new`\n"
            f"# from the detector example's settings. `make tune MODEL={name}` measures workers x batch x delay.\n"
            + body)


def new_files(name: str, module: torch.nn.Module, coco: bool, labels: list[str] | None, variants: tuple[str, ...],
              photos: dict[str, bytes], examples: Path) -> tuple[str, dict[Path, bytes]]:
    """object-detection for `tsforge new`: the model checked on an example photo (its output, labels, and that
    torch.jit.script compiles it), its config and the example photos for `examples` (examples/NAME/)."""
    if variants:
        raise NewError("object-detection exports scripted fp32 TorchScript only; expected no --variants (or none)")
    sizes = Sizes.of(module)
    image = detector_input(next(iter(photos.values())), sizes)
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
    return config_for(name, sizes), {examples / photo: data for photo, data in photos.items()}
