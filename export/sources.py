"""What the declarations `tsforge new` writes call at export time: the model's source (torchvision, a factory
file, TorchScript, a torch.export program) and the task's preparation (image classification, tensors), built on
the examples' own helpers (export/models/resnet.py) so a user's model gets the same exports and checks.

A declaration (models/NAME.py) reads:

    from export.sources import Source, image_classification
    SPEC = image_classification("mnv3", Source("torchvision:mobilenet_v3_small"), root=ROOT, labels=None, ...)
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.failures import NewError, existing_file, run_once, short_message
from export.hf_folder import load_classifier
from export.hf_folder import text_classification as text_classification  # what declarations import
from export.models import resnet
from export.spec import ModelSpec, PreparedModel

ROOT = Path(__file__).resolve().parent.parent
IMAGE_VARIANTS = ("int8", "onnx")
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit")
SEED = 0
TENSOR_EXAMPLES = 3
TENSOR_HELDOUT = 64
DTYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
          "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
IMAGE_INPUT = "a [N, 3, 224, 224] float batch (ImageNet-normalised photos)"


# ---- sources: what the declarations call at export time ----

@dataclass(frozen=True)
class Source:
    """Where a model comes from: `torchvision:NAME`, `FILE.py:FUNCTION`, a TorchScript `.pt`, a `.pt2` program or a
    local Hugging Face model folder (export/hf_folder.py).

    Paths are relative to the root of the tree that declares the model (or absolute)."""

    spec: str
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a torchvision constructor

    @property
    def kind(self) -> str:
        if self.spec.startswith("torchvision:"):
            return "torchvision"
        if re.fullmatch(r".+\.py:[A-Za-z_]\w*", self.spec):
            return "factory"
        if self.spec.endswith(".pt2"):
            return "export"
        if self.spec.endswith(TORCHSCRIPT_SUFFIXES):
            return "torchscript"
        if self.spec.endswith("/") or not Path(self.spec).suffix:  # a name without a suffix: a folder
            return "hf-folder"
        raise NewError(f"cannot tell what source {self.spec!r} is: expected torchvision:NAME, FILE.py:FUNCTION, "
                       f"a TorchScript file ({', '.join(TORCHSCRIPT_SUFFIXES)}), a torch.export program (.pt2) or a "
                       "local Hugging Face model folder")

    def load(self, root: Path) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...] | None]:
        """The eager module (in eval mode) and, when the source gives them, its example inputs."""
        kind = self.kind
        inputs: tuple[torch.Tensor, ...] | None = None
        if kind == "torchvision":
            module = _torchvision(self.spec.partition(":")[2], self.options)
        elif kind == "factory":
            module, inputs = _factory(root, self.spec)
        elif kind == "torchscript":
            path = existing_file(root, self.spec, "TorchScript file")
            with contextlib.suppress(ImportError):  # registers the ops a scripted detector calls (nms, roi_align)
                import torchvision  # noqa: F401
            try:
                module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
            except Exception as exc:
                raise NewError(f"{path} is not a TorchScript file (expected what torch.jit.save writes; a state dict "
                               f"goes with --weights): {short_message(exc)}") from exc
        elif kind == "hf-folder":
            module = load_classifier(root / self.spec)
        else:
            path = existing_file(root, self.spec, "torch.export program")
            try:
                module = ExportedProgram(torch.export.load(str(path)).module())
            except Exception as exc:
                raise NewError(f"{path} is not a torch.export program (expected what torch.export.save writes): "
                               f"{short_message(exc)}") from exc
        if self.weights:
            _load_weights(module, existing_file(root, self.weights, "state-dict file (--weights)"))
        return module.eval(), inputs


class ExportedProgram(torch.nn.Module):
    """A `torch.export` program's module as an eager one: it has no train/eval switch (its mode was fixed when it
    was exported), so `eval()` here only records the flag instead of raising."""

    def __init__(self, program: torch.nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> ExportedProgram:
        self.training = mode
        return self

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.program(*inputs)


def _torchvision(name: str, options: dict[str, Any]) -> torch.nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        # a segmenter's backbone weights default to ImageNet's, which would be downloaded
        return _seeded(torchvision.models.get_model, name, weights=None, weights_backbone=None, **options)
    if name in torchvision.models.list_models(module=torchvision.models.detection):
        # so do a detector's (object-detection)
        return _seeded(torchvision.models.get_model, name, weights=None, weights_backbone=None, **options)
    if name not in available:
        raise NewError(f"torchvision has no classification model {name!r}; expected one of torchvision.models' "
                       f"(e.g. {', '.join(n for n in available if 'mobilenet' in n)})")
    torch.manual_seed(SEED)  # random weights are the same at `new` and at every export
    module: torch.nn.Module = torchvision.models.get_model(name, weights=None, **options)
    return module


def _seeded(factory: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(SEED)  # random weights are the same at `new` and at every export
    module: torch.nn.Module = factory(*args, **kwargs)
    return module


def _factory(root: Path, spec: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...] | None]:
    file, _, function = spec.rpartition(":")
    path = existing_file(root, file, "factory file")
    from export.registry import import_file  # here: the registry imports the declarations, which import us

    try:
        loaded = import_file(path, "tsforge_user_factories")
    except ImportError as exc:
        raise NewError(short_message(exc)) from exc
    factory = getattr(loaded, function, None)
    if not callable(factory):
        raise NewError(f"{path} has no function {function!r} (expected {spec} to name a function returning an "
                       "nn.Module, or an nn.Module and its example inputs)")
    torch.manual_seed(SEED)
    try:
        result = factory()
    except Exception as exc:
        raise NewError(f"{spec}() failed: {type(exc).__name__}: {short_message(exc)}") from exc
    inputs: tuple[torch.Tensor, ...] | None = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        result, given = result
        inputs = (given,) if isinstance(given, torch.Tensor) else tuple(given)
    if not isinstance(result, torch.nn.Module):
        raise NewError(f"{spec}() returned {type(result).__name__}; expected an nn.Module, or an nn.Module and its "
                       "example inputs")
    return result, inputs


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NewError(f"{path} is not a state dict that torch.load(weights_only=True) reads (expected "
                       f"torch.save(model.state_dict(), ...)): {short_message(exc)}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise NewError(f"{path} holds a {type(state).__name__}; expected a state dict (torch.save(model.state_dict()))")
    try:
        module.load_state_dict(state)
    except Exception as exc:
        raise NewError(f"the weights in {path} do not fit the model (expected its state dict): "
                       f"{short_message(exc)}") from exc


# ---- image classification ----

#: the example images a declaration reads back from examples/NAME/ (`tsforge new --examples`)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def photo_files(root: Path, name: str) -> list[bytes]:
    """The example images `new` wrote (or the user put) in examples/NAME/; the sample photos where there are none."""
    folder = root / "examples" / name
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    if files:
        return [p.read_bytes() for p in files]
    return [resnet.jpeg(photo) for photo in resnet.sample_photos().values()]


def read_labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def class_labels(source: Source, classes: int, labels: list[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != classes:
            raise NewError(f"the labels file has {len(labels)} labels; the model has {classes} classes")
        return labels
    if source.kind == "torchvision" and classes == 1000:
        return resnet.imagenet_labels()
    return [str(i) for i in range(classes)]


def classes_of(module: torch.nn.Module, image: torch.Tensor) -> int:
    """The number of classes, checking that the model maps an image batch to [N, classes] logits."""
    output = run_once(module, image, f"image-classification expects a model taking {IMAGE_INPUT}")
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != image.shape[0] \
            or output.shape[1] < 2 or not output.is_floating_point():
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise NewError(f"image-classification expects [N, classes] float logits for {IMAGE_INPUT} (N=1 gave {got}); "
                       "use --task tensor for other outputs")
    return int(output.shape[1])


def build_image(name: str, source: Source, root: Path, labels: str | None) -> PreparedModel:
    module, _ = source.load(root)
    photos = photo_files(root, name)
    classes = classes_of(module, resnet.imagenet_tensor(photos[0]).unsqueeze(0))
    names = class_labels(source, classes, read_labels(root / labels) if labels else None)
    return resnet.prepare_classifier(module, names, examples=photos)


def image_classification(name: str, source: Source, *, root: Path, labels: str | None = None,
                         variants: tuple[str, ...] = IMAGE_VARIANTS, revision: int = 1) -> ModelSpec:
    """The declaration of an image classifier from any source (what models/NAME.py calls)."""
    return resnet.classifier_spec(name, partial(build_image, name, source, root, labels),
                                  description=f"image classifier from {source.spec}", variants=variants,
                                  revision=revision)


# ---- tensors ----

def tensor_examples(root: Path, name: str) -> list[np.ndarray]:
    folder = root / "examples" / name
    return [np.asarray(json.loads(p.read_text())["data"]) for p in sorted(folder.glob("*.json"))]


def random_arrays(shape: tuple[int, ...], dtype: str, count: int, seed: int) -> np.ndarray:
    """`count` seeded random arrays of `shape`: standard normal rounded to 6 places (JSON carries them exactly
    enough), or small integers."""
    rng = np.random.default_rng(seed)
    kind = np.dtype(dtype).kind
    if kind == "f":
        return rng.standard_normal((count, *shape)).round(6).astype(dtype)
    if kind == "b":
        return rng.integers(0, 2, (count, *shape)).astype(dtype)
    return rng.integers(0, 10, (count, *shape)).astype(dtype)


def run_tensor(module: torch.nn.Module, batch: torch.Tensor, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    expected = f"a tensor model taking a [N, {', '.join(map(str, shape))}] {dtype} batch and returning one tensor"
    output = run_once(module, batch, f"tensor expects {expected}")
    if not isinstance(output, torch.Tensor) or output.dim() < 1 or output.shape[0] != batch.shape[0]:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise NewError(f"tensor expects {expected} with the batch first; N={batch.shape[0]} gave {got}")
    return output


def build_tensor(name: str, source: Source, root: Path, shape: tuple[int, ...], dtype: str) -> PreparedModel:
    module, _ = source.load(root)
    examples = tensor_examples(root, name) or list(random_arrays(shape, dtype, TENSOR_EXAMPLES, SEED))
    batch = torch.from_numpy(np.stack(examples).astype(dtype))
    output = run_tensor(module, batch, shape, dtype)
    heldout = random_arrays(shape, dtype, TENSOR_HELDOUT, SEED + 2)
    cases = [{"input": {"data": example.tolist()}, "expect": {"shape": list(output.shape[1:])}} for example in examples]
    return PreparedModel(
        module=module,
        example_inputs=(batch[:1],),
        check_inputs=(torch.cat([batch, torch.from_numpy(random_arrays(shape, dtype, 3, SEED + 1))]),),
        extra_files={"examples.json": json.dumps(cases).encode()},
        calibration=(torch.from_numpy(random_arrays(shape, dtype, 32, SEED + 3)),),
        heldout=[{"data": array.tolist()} for array in heldout],
        heldout_about=f"{TENSOR_HELDOUT} seeded random {dtype} arrays of shape {list(shape)}",
    )


def tensor_model(name: str, source: Source, *, root: Path, shape: tuple[int, ...], dtype: str = "float32",
                 variants: tuple[str, ...] = (), revision: int = 1) -> ModelSpec:
    """The declaration of a tensor-in, tensor-out model from any source (what models/NAME.py calls)."""
    return ModelSpec(name=name, revision=revision, factory=partial(build_tensor, name, source, root, shape, dtype),
                     handler="handlers/tensor_handler.py", description=f"tensor model from {source.spec}",
                     variants=variants, accuracy=("min_cosine", 0.99) if np.dtype(dtype).kind == "f" else None)


# ---- image segmentation ----

def segmentation_classes(module: torch.nn.Module, image: torch.Tensor) -> int:
    """The number of classes, checking that the model maps an image batch to [N, classes, H, W] logits (a tensor,
    or torchvision's dict with "out") at the input's height and width."""
    from export.models.segmentation import OutTensor

    expected = f"image-segmentation expects a model taking {IMAGE_INPUT}"
    output = run_once(OutTensor(module), image, expected)
    if not isinstance(output, torch.Tensor) or output.dim() != 4 or output.shape[0] != image.shape[0] \
            or tuple(output.shape[2:]) != tuple(image.shape[2:]) or output.shape[1] < 2 \
            or not output.is_floating_point():
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise NewError(f"{expected} and returning [N, classes, H, W] float logits at the input's size (or a dict "
                       f"with them under \"out\"); N=1 gave {got}")
    return int(output.shape[1])


def segmentation_labels(source: Source, classes: int, labels: list[str] | None) -> list[str]:
    from export.models.segmentation import voc_labels

    if labels is not None:
        return class_labels(source, classes, labels)
    if source.kind == "torchvision" and classes == len(voc_labels()):
        return voc_labels()
    return [str(i) for i in range(classes)]


def build_segmenter(name: str, source: Source, root: Path, labels: str | None) -> PreparedModel:
    from export.models import segmentation

    module, _ = source.load(root)
    photos = photo_files(root, name)
    classes = segmentation_classes(module, segmentation.segmenter_tensor(photos[0]).unsqueeze(0))
    names = segmentation_labels(source, classes, read_labels(root / labels) if labels else None)
    return segmentation.prepare_segmenter(module, names, examples=photos)


def image_segmentation(name: str, source: Source, *, root: Path, labels: str | None = None,
                       revision: int = 1) -> ModelSpec:
    """The declaration of an image segmenter from any source (what models/NAME.py calls): fp32 TorchScript."""
    from export.models import segmentation

    return segmentation.segmenter_spec(name, partial(build_segmenter, name, source, root, labels),
                                       description=f"image segmenter from {source.spec}", revision=revision)


# ---- object detection ----

def build_detector(name: str, source: Source, root: Path, labels: str | None) -> PreparedModel:
    from export.models import detection

    module, _ = source.load(root)
    names = detection.detector_labels(module, source.kind == "torchvision" and not source.options,
                                      read_labels(root / labels) if labels else None)
    return detection.prepare_detector(module, names, examples=photo_files(root, name))


def object_detection(name: str, source: Source, *, root: Path, labels: str | None = None,
                     revision: int = 1) -> ModelSpec:
    """The declaration of an object detector from any source (what models/NAME.py calls): scripted fp32 TorchScript."""
    from export.models import detection

    return detection.detector_spec(name, partial(build_detector, name, source, root, labels),
                                   description=f"object detector from {source.spec}", revision=revision)
