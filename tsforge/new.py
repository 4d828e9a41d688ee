"""tsforge new NAME --task TASK --from SOURCE: declare your own model, with no file of the toolkit edited.

    tsforge new mnv3 --task image-classification --from torchvision:mobilenet_v3_small [--weights W.pth]
    tsforge new mine --task image-classification --from path/to/file.py:build [--labels labels.txt]
    tsforge new scripted --task image-classification --from model.pt          # TorchScript (torch.jit.save)
    tsforge new exported --task image-classification --from model.pt2         # torch.export (torch.export.save)
    tsforge new tiny --task tensor --from model.pt --input-shape 1,8,8 --dtype float32

Sources: `torchvision:NAME` (random weights, seeded, unless `--weights FILE`: a state dict, read with
`torch.load(weights_only=True)`, never a full pickle); `FILE.py:FUNCTION`, a function returning an nn.Module or
(nn.Module, example inputs) (`--weights` applies too); a TorchScript file (`.pt`, `.pth`, `.ts`); a `torch.export`
program (`.pt2`).

Tasks: `image-classification` (handlers/image_handler.py, ImageNet preprocessing: a [N, 3, 224, 224] batch in,
[N, classes] logits out; labels from `--labels FILE`, one per line, or ImageNet's for a torchvision model with
1000 classes, else "0".."N-1") and `tensor` (handlers/tensor_handler.py: `--input-shape` without the batch
dimension, `--dtype`).

It writes into the user's tree (the project checkout, or `--root DIR`):

    models/NAME.py            the declaration, discovered by export/registry.py (so is any folder in TSFORGE_MODELS)
    config/models/NAME.yaml   workers, batch size and delay, the handler: and v2: sections
    examples/NAME/            example inputs: the two sample photos as JPEG files, or seeded random arrays (.json)

The model runs once on the example input before anything is written: a missing file, a source that cannot be
loaded or traced, or a task that does not fit the model is one line naming what was expected, exit 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.models import resnet
from export.spec import ModelSpec, PreparedModel

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("image-classification", "tensor")
IMAGE_VARIANTS = ("int8", "onnx")
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit")
SEED = 0
TENSOR_EXAMPLES = 3
TENSOR_HELDOUT = 64
DTYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
          "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
IMAGE_INPUT = "a [N, 3, 224, 224] float batch (ImageNet-normalised photos)"


class NewError(Exception):
    """Bad input to `tsforge new` (or to a declaration it wrote): one line, exit 2."""


# ---- sources: what the declarations call at export time ----

@dataclass(frozen=True)
class Source:
    """Where a model comes from: `torchvision:NAME`, `FILE.py:FUNCTION`, a TorchScript `.pt` or a `.pt2` program.

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
        raise NewError(f"cannot tell what source {self.spec!r} is: expected torchvision:NAME, FILE.py:FUNCTION, "
                       f"a TorchScript file ({', '.join(TORCHSCRIPT_SUFFIXES)}) or a torch.export program (.pt2)")

    def load(self, root: Path) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...] | None]:
        """The eager module (in eval mode) and, when the source gives them, its example inputs."""
        kind = self.kind
        inputs: tuple[torch.Tensor, ...] | None = None
        if kind == "torchvision":
            module = _torchvision(self.spec.partition(":")[2], self.options)
        elif kind == "factory":
            module, inputs = _factory(root, self.spec)
        elif kind == "torchscript":
            path = _existing(root, self.spec, "TorchScript file")
            try:
                module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
            except Exception as exc:
                raise NewError(f"{path} is not a TorchScript file (expected what torch.jit.save writes; a state dict "
                               f"goes with --weights): {_short(exc)}") from exc
        else:
            path = _existing(root, self.spec, "torch.export program")
            try:
                module = ExportedProgram(torch.export.load(str(path)).module())
            except Exception as exc:
                raise NewError(f"{path} is not a torch.export program (expected what torch.export.save writes): "
                               f"{_short(exc)}") from exc
        if self.weights:
            _load_weights(module, _existing(root, self.weights, "state-dict file (--weights)"))
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


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _existing(root: Path, name: str, what: str) -> Path:
    path = root / name
    if not path.is_file():
        raise NewError(f"{what} {path} does not exist")
    return path


def _torchvision(name: str, options: dict[str, Any]) -> torch.nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise NewError(f"torchvision has no classification model {name!r}; expected one of torchvision.models' "
                       f"(e.g. {', '.join(n for n in available if 'mobilenet' in n)})")
    torch.manual_seed(SEED)  # random weights are the same at `new` and at every export
    module: torch.nn.Module = torchvision.models.get_model(name, weights=None, **options)
    return module


def _factory(root: Path, spec: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...] | None]:
    file, _, function = spec.rpartition(":")
    path = _existing(root, file, "factory file")
    from export.registry import import_file  # here: the registry imports the declarations, which import us

    try:
        loaded = import_file(path, "tsforge_user_factories")
    except ImportError as exc:
        raise NewError(_short(exc)) from exc
    factory = getattr(loaded, function, None)
    if not callable(factory):
        raise NewError(f"{path} has no function {function!r} (expected {spec} to name a function returning an "
                       "nn.Module, or an nn.Module and its example inputs)")
    torch.manual_seed(SEED)
    try:
        result = factory()
    except Exception as exc:
        raise NewError(f"{spec}() failed: {type(exc).__name__}: {_short(exc)}") from exc
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
                       f"torch.save(model.state_dict(), ...)): {_short(exc)}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise NewError(f"{path} holds a {type(state).__name__}; expected a state dict (torch.save(model.state_dict()))")
    try:
        module.load_state_dict(state)
    except Exception as exc:
        raise NewError(f"the weights in {path} do not fit the model (expected its state dict): {_short(exc)}") from exc


# ---- image classification ----

def photo_files(root: Path, name: str) -> list[bytes]:
    """The example images `new` wrote (or the user put) in examples/NAME/; the sample photos where there are none."""
    folder = root / "examples" / name
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp"))
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
    try:
        with torch.inference_mode():
            output = module(image)
    except Exception as exc:
        raise NewError(f"image-classification expects a model taking {IMAGE_INPUT}; it failed on one: "
                       f"{type(exc).__name__}: {_short(exc)}") from exc
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
    try:
        with torch.inference_mode():
            output = module(batch)
    except Exception as exc:
        raise NewError(f"tensor expects {expected}; it failed on one: {type(exc).__name__}: {_short(exc)}") from exc
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


# ---- what `new` writes ----

def relative(root: Path, path: Path) -> str:
    """`path` as the declaration records it: relative to the root when inside it, absolute otherwise."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(root.resolve()))
    except ValueError:
        return str(resolved)


def declaration(name: str, task: str, source: Source, *, labels: str | None, variants: tuple[str, ...],
                shape: tuple[int, ...], dtype: str) -> str:
    source_args = [repr(source.spec)]
    if source.weights:
        source_args.append(f"weights={source.weights!r}")
    if source.options:
        source_args.append(f"options={source.options!r}")
    if task == "image-classification":
        call = "image_classification"
        args = [f"labels={labels!r}", f"variants={variants!r}"]
    else:
        call = "tensor_model"
        args = [f"shape={shape!r}", f"dtype={dtype!r}", f"variants={variants!r}"]
    body = ",\n    ".join([repr(name), f"Source({', '.join(source_args)})", "root=ROOT", *args, "revision=1"])
    return f'''"""{name}: {task} from {source.spec}, declared by `tsforge new`.

Edit freely: export/registry.py finds this file; nothing of the toolkit lists it.

Export: `tsforge export {name}`; archive: `make archive MODEL={name} MODELS={name}`; serving settings:
config/models/{name}.yaml; example inputs: examples/{name}/. A new revision (below) makes a new archive version.
"""

from pathlib import Path

from tsforge.new import Source, {call}

ROOT = Path(__file__).resolve().parent.parent

SPEC = {call}(
    {body},
)
'''


def image_config(name: str, classes: int) -> str:
    return f"""# TorchServe model-config.yaml for {name} (packaged as model-config.yaml), written by `tsforge new`.
# `make tune MODEL={name}` measures better workers x batch x delay for this machine.
minWorkers: 1
maxWorkers: 1
batchSize: 8
maxBatchDelay: 5        # ms
responseTimeout: 60     # s
handler:
  # backend x precision x fusion: `auto` measures at worker start what this device runs natively and the archive
  # carries, and serves the fastest within auto_tolerance of fp32 whose answers to the held-out photos keep
  # top-1 agreement >= 0.95 with fp32 on this machine (handlers/accuracy.py). Name a value to pin it.
  backend: auto         # torchscript | onnxruntime | aotinductor | auto
  precision: auto       # fp32 | bf16 | fp16 | int8 | auto
  onednn_fusion: auto   # true | false | auto
  auto_tolerance: 0.02
  channels_last: true
  mode: RGB
  resize: 256           # shorter side
  crop: 224             # centre crop
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
  resample: bilinear
  draft: true
  max_pixels: 40000000  # larger images are answered with 413
  top_k: {min(5, classes)}
# Open Inference Protocol tensors, as `make serve`'s v2 front (tsforge/front.py) describes them to clients
v2:
  inputs:
    - {{name: image, datatype: BYTES, shape: [-1]}}
  outputs:
    - {{name: output, datatype: FP32, shape: [-1, {classes}]}}
    - {{name: label, datatype: BYTES, shape: [-1]}}
"""


def tensor_config(name: str, shape: tuple[int, ...], dtype: str, output: torch.Tensor) -> str:
    out_type = DTYPES.get(str(output.dtype).removeprefix("torch."), "FP32")
    return f"""# TorchServe model-config.yaml for {name} (packaged as model-config.yaml), written by `tsforge new`.
minWorkers: 1
maxWorkers: 1
batchSize: 16
maxBatchDelay: 5        # ms
responseTimeout: 30     # s
handler:
  input:                # one item, without the batch dimension; -1 would mean "any size"
    shape: {list(shape)}
    dtype: {dtype}
  casting: safe         # typed payloads (.npy, v2) must cast to {dtype} without loss
  max_elements: 4194304 # larger arrays are answered with 413
  v2_output: output
# Open Inference Protocol tensors, as `make serve`'s v2 front (tsforge/front.py) describes them to clients
v2:
  inputs:
    - {{name: input, datatype: {DTYPES[dtype]}, shape: {[-1, *shape]}}}
  outputs:
    - {{name: output, datatype: {out_type}, shape: {[-1, *output.shape[1:]]}}}
"""


def check_traceable(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Trace as `tsforge export` will, and compare: a source that cannot be traced is refused now."""
    if isinstance(module, torch.jit.ScriptModule):
        return
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation, and the guards of a .pt2 program traced as constants
            traced = torch.jit.trace(module, inputs, check_trace=False)  # type: ignore[no-untyped-call]
            expected, actual = module(*inputs), traced(*inputs)
    except Exception as exc:
        raise NewError(f"the model cannot be traced to TorchScript (expected a module torch.jit.trace can follow "
                       f"on the example input): {type(exc).__name__}: {_short(exc)}") from exc
    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        diff = float((expected.float() - actual.float()).abs().max()) if expected.numel() else 0.0
        if not diff <= 1e-4:
            raise NewError(f"the traced model differs from the eager one by {diff:.3g} on the example input (expected "
                           "no data-dependent control flow; a TorchScript or .pt2 source avoids tracing)")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise NewError(f"--input-shape {text!r}: expected sizes separated by commas, e.g. 1,8,8") from None
    if not shape or any(size < 1 for size in shape):
        raise NewError(f"--input-shape {text!r}: expected positive sizes separated by commas, e.g. 1,8,8")
    return shape


def parse_variants(text: str | None, task: str, source: Source) -> tuple[str, ...]:
    from export.variants import SUFFIXES

    if text is None:  # int8 (FX) and ONNX export need an eager module, not a compiled program
        return IMAGE_VARIANTS if task == "image-classification" and source.kind in ("torchvision", "factory") else ()
    chosen = tuple(v for v in text.split(",") if v and v != "none")
    unknown = [v for v in chosen if v not in SUFFIXES]
    if unknown:
        raise NewError(f"unknown variant {unknown[0]!r}: expected some of {', '.join(SUFFIXES)} (or none)")
    return chosen


def create(args: argparse.Namespace) -> list[Path]:
    root: Path = args.root.resolve()
    name: str = args.name
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise NewError(f"model name {name!r}: expected a letter then letters, digits or _ (it names a module and "
                       "a URL)")
    from export.registry import BUILTIN

    if (BUILTIN / f"{name}.py").exists() or name in {"digits", "digits_tensor", "minilm", "resnet18", "resnet50"}:
        raise NewError(f"{name!r} is one of the toolkit's example models; expected another name")
    files = {"declaration": root / "models" / f"{name}.py", "config": root / "config" / "models" / f"{name}.yaml"}
    existing = [str(p) for p in files.values() if p.exists()]
    if existing and not args.force:
        raise NewError(f"{existing[0]} already exists (expected a new name, or --force to replace it)")
    if args.task == "image-classification" and (args.input_shape or args.dtype != "float32"):
        raise NewError("--input-shape and --dtype are for --task tensor; image-classification takes "
                       f"{IMAGE_INPUT}")
    weights = relative(root, Path(args.weights)) if args.weights else None
    if weights:
        _existing(root, weights, "state-dict file (--weights)")
    source_spec: str = args.source
    source = Source(source_spec, weights=weights, options={"num_classes": args.num_classes} if args.num_classes else {})
    if source.kind != "torchvision":  # paths are recorded relative to the root
        file, colon, function = source_spec.rpartition(":") if source.kind == "factory" else (source_spec, "", "")
        source = Source(relative(root, Path(file)) + colon + function, weights=weights, options=source.options)
    if source.options and source.kind != "torchvision":
        raise NewError("--num-classes is for torchvision:NAME sources; expected the model's own output otherwise")
    labels = relative(root, Path(args.labels)) if args.labels else None
    if labels:
        _existing(root, labels, "labels file (--labels)")
    variants = parse_variants(args.variants, args.task, source)
    module, given = source.load(root)

    written: list[Path] = []
    examples = root / "examples" / name
    if args.task == "image-classification":
        photos = [resnet.jpeg(photo) for photo in resnet.sample_photos().values()]
        image = resnet.imagenet_tensor(photos[0]).unsqueeze(0)
        classes = classes_of(module, image)
        class_labels(source, classes, read_labels(root / labels) if labels else None)
        check_traceable(module, (image,))
        shape: tuple[int, ...] = ()
        dtype = "float32"
        config = image_config(name, classes)
        contents = {examples / f"{photo}": data for photo, data in zip(resnet.PHOTO_FILES, photos, strict=True)}
    else:
        if args.input_shape:
            shape, dtype = parse_shape(args.input_shape), args.dtype
        elif given:
            shape, dtype = tuple(given[0].shape[1:]), str(given[0].dtype).removeprefix("torch.")
        else:
            raise NewError("--task tensor needs --input-shape (sizes without the batch dimension, e.g. 1,8,8)")
        if dtype not in DTYPES:
            raise NewError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        arrays = random_arrays(shape, dtype, TENSOR_EXAMPLES, SEED)
        output = run_tensor(module, torch.from_numpy(arrays), shape, dtype)
        check_traceable(module, (torch.from_numpy(arrays[:1]),))
        config = tensor_config(name, shape, dtype, output)
        contents = {examples / f"input{i}.json": json.dumps({"data": a.tolist()}).encode()
                    for i, a in enumerate(arrays)}
    contents[files["config"]] = config.encode()
    contents[files["declaration"]] = declaration(name, args.task, source, labels=labels, variants=variants,
                                                 shape=shape, dtype=dtype).encode()
    for path, content in contents.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.new", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the model's name: archive, endpoint and declaration module")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                        help="torchvision:NAME, FILE.py:FUNCTION, a TorchScript file or a .pt2 program")
    parser.add_argument("--weights", help="a state dict for the model (torch.load with weights_only=True)")
    parser.add_argument("--num-classes", type=int, help="torchvision:NAME's output classes (default 1000)")
    parser.add_argument("--labels", help="class names, one per line (image-classification)")
    parser.add_argument("--input-shape", help="one input without the batch dimension, e.g. 1,8,8 (tensor)")
    parser.add_argument("--dtype", default="float32", help="the input's dtype (tensor; default float32)")
    parser.add_argument("--variants", help="exports beside fp32 TorchScript, comma-separated, or none "
                        "(default: int8,onnx for image classifiers from torchvision or a factory)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the tree to write into (default: this checkout; "
                        "a folder outside it is found through TSFORGE_MODELS=ROOT/models)")
    parser.add_argument("--force", action="store_true", help="replace an existing declaration and config")
    args = parser.parse_args(argv)
    prog = "tsforge new"
    try:
        with warnings.catch_warnings():  # torch's deprecation notices about jit.load/trace: the answer is one line
            warnings.simplefilter("ignore")
            written = create(args)
    except NewError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    root = args.root.resolve()
    for path in written:
        print(f"wrote {relative(root, path)}")
    name = args.name
    if root == ROOT.resolve():
        print(f"next: make archive MODEL={name} MODELS={name} && make serve MODEL={name}")
    else:
        print(f"next: TSFORGE_MODELS={root / 'models'} tsforge export {name} --out-dir build && "
              f"TSFORGE_MODELS={root / 'models'} tsforge archive {name} --config {root}/config/models/{name}.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
