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
1000 classes, else "0".."N-1"), `image-segmentation` (handlers/segmentation_handler.py: each image scaled to
224 x 224 in, [N, classes, 224, 224] logits or torchvision's {"out": ...} out; the class map comes back as a PNG
or runs at the image's size; labels from `--labels`, VOC's for a torchvision segmenter with 21 classes) and
`tensor` (handlers/tensor_handler.py: `--input-shape` without the batch dimension, `--dtype`).

    tsforge new seg --task image-segmentation --from torchvision:lraspp_mobilenet_v3_large
    tsforge new det --task object-detection --from torchvision:fasterrcnn_mobilenet_v3_large_320_fpn

`object-detection` (handlers/detection_handler.py: a list of [3, H, W] images in [0, 1] in, torchvision's dicts of
boxes, labels and scores out; scripted, not traced; labels from `--labels`, COCO's for a torchvision detector).

    tsforge new mytext --task text-classification --from path/to/hf_folder

`text-classification` (handlers/text_classification_handler.py, export/hf_folder.py) takes a local Hugging Face
sequence-classifier folder, as save_pretrained writes it: config.json (an *ForSequenceClassification architecture;
labels from its id2label), model.safetensors and tokenizer.json. Nothing is fetched; (input_ids, attention_mask) ->
logits is traced, and the tokenizer and labels travel in the archive.

It writes into the user's tree (the project checkout, or `--root DIR`):

    models/NAME.py            the declaration, discovered by export/registry.py (so is any folder in TSFORGE_MODELS)
    config/models/NAME.yaml   workers, batch size and delay, the handler: and v2: sections
    examples/NAME/            example inputs: the two sample photos as JPEG files (scikit-learn's, from the
                              examples extra; or yours: --examples IMAGE...), or seeded random arrays (.json)

The model runs once on the example input before anything is written: a missing file, a source that cannot be
loaded or traced, or a task that does not fit the model is one line naming what was expected, exit 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import torch

from export.failures import NewError, existing_file, short_message
from export.models import resnet
from export.sources import (
    DTYPES,
    IMAGE_INPUT,
    IMAGE_VARIANTS,
    PHOTO_SUFFIXES,
    SEED,
    TENSOR_EXAMPLES,
    Source,
    class_labels,
    classes_of,
    random_arrays,
    read_labels,
    run_tensor,
)
from tsforge.extras import MissingExtra
from tsforge.project import ROOT

TASKS = ("image-classification", "image-segmentation", "text-classification", "tensor", "object-detection")


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
    elif task == "image-segmentation":
        call = "image_segmentation"
        args = [f"labels={labels!r}"]
    elif task == "object-detection":
        call = "object_detection"
        args = [f"labels={labels!r}"]
    elif task == "text-classification":
        call = "text_classification"
        args = [f"variants={variants!r}"]
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

from export.sources import Source, {call}

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
# Open Inference Protocol tensors, as `make serve`'s v2 front (tsforge/serving/front.py) describes them to clients
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
# Open Inference Protocol tensors, as `make serve`'s v2 front (tsforge/serving/front.py) describes them to clients
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
                       f"on the example input): {type(exc).__name__}: {short_message(exc)}") from exc
    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        diff = float((expected.float() - actual.float()).abs().max()) if expected.numel() else 0.0
        if not diff <= 1e-4:
            raise NewError(f"the traced model differs from the eager one by {diff:.3g} on the example input (expected "
                           "no data-dependent control flow; a TorchScript or .pt2 source avoids tracing)")


def example_photos(given: list[str] | None) -> dict[str, bytes]:
    """The example images for examples/NAME/, by file name: the user's (`--examples`), else scikit-learn's sample
    photos; without the `examples` extra and without --examples, one line naming both ways."""
    if not given:
        try:
            return {name: resnet.jpeg(photo) for name, photo in resnet.sample_photos().items()}
        except MissingExtra as exc:
            raise NewError(f"{exc}; or give your own example images: --examples IMAGE [IMAGE ...]") from None
    found: dict[str, bytes] = {}
    for name in given:
        path = Path(name)
        if not path.is_file() or path.suffix.lower() not in PHOTO_SUFFIXES:
            raise NewError(f"example image {path}: expected an existing {'/'.join(PHOTO_SUFFIXES)} file")
        try:
            resnet.imagenet_tensor(path.read_bytes())
        except Exception as exc:
            raise NewError(f"example image {path} does not decode as an image: {short_message(exc)}") from exc
        found[path.name] = path.read_bytes()
    return found


def segmenter_files(name: str, module: torch.nn.Module, source: Source, root: Path, labels: str | None,
                    variants: tuple[str, ...], given: list[str] | None) -> tuple[str, dict[Path, bytes]]:
    """image-segmentation: the model checked on an example photo (classes, labels, tracing), its config (the
    shipped segmenter's settings) and example photos."""
    from export.models import segmentation
    from export.sources import segmentation_classes, segmentation_labels

    if variants:
        raise NewError("image-segmentation exports fp32 TorchScript only; expected no --variants (or none)")
    named = example_photos(given)
    image = segmentation.segmenter_tensor(next(iter(named.values()))).unsqueeze(0)
    classes = segmentation_classes(module, image)
    segmentation_labels(source, classes, read_labels(root / labels) if labels else None)
    check_traceable(segmentation.OutTensor(module), (image,))
    folder = root / "examples" / name
    return segmentation.config_for(name), {folder / photo: data for photo, data in named.items()}


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
    if args.task != "tensor" and (args.input_shape or args.dtype != "float32"):
        raise NewError(f"--input-shape and --dtype are for --task tensor; {args.task} takes "
                       f"{IMAGE_INPUT}")
    if args.examples and args.task == "tensor":
        raise NewError("--examples is for image-classification; a tensor model's examples are seeded random arrays "
                       "(edit examples/NAME/*.json after)")
    weights = relative(root, Path(args.weights)) if args.weights else None
    if weights:
        existing_file(root, weights, "state-dict file (--weights)")
    source_spec: str = args.source
    source = Source(source_spec, weights=weights, options={"num_classes": args.num_classes} if args.num_classes else {})
    if source.kind != "torchvision":  # paths are recorded relative to the root
        file, colon, function = source_spec.rpartition(":") if source.kind == "factory" else (source_spec, "", "")
        source = Source(relative(root, Path(file)) + colon + function, weights=weights, options=source.options)
    if source.options and source.kind != "torchvision":
        raise NewError("--num-classes is for torchvision:NAME sources; expected the model's own output otherwise")
    labels = relative(root, Path(args.labels)) if args.labels else None
    if labels:
        existing_file(root, labels, "labels file (--labels)")
    variants = parse_variants(args.variants, args.task, source)
    module, given = source.load(root)

    written: list[Path] = []
    examples = root / "examples" / name
    if args.task == "image-classification":
        named = example_photos(args.examples)
        photos = list(named.values())
        image = resnet.imagenet_tensor(photos[0]).unsqueeze(0)
        classes = classes_of(module, image)
        class_labels(source, classes, read_labels(root / labels) if labels else None)
        check_traceable(module, (image,))
        shape: tuple[int, ...] = ()
        dtype = "float32"
        config = image_config(name, classes)
        contents = {examples / photo: data for photo, data in named.items()}
    elif args.task == "image-segmentation":
        shape, dtype = (), "float32"
        config, contents = segmenter_files(name, module, source, root, labels, variants, args.examples)
    elif args.task == "object-detection":
        from export.models import detection

        shape, dtype = (), "float32"
        coco = source.kind == "torchvision" and not source.options
        config, contents = detection.new_files(name, module, coco, read_labels(root / labels) if labels else None,
                                               variants, example_photos(args.examples), examples)
    elif args.task == "text-classification":
        from export.hf_folder import new_files

        shape, dtype = (), "float32"
        config, contents, texts = new_files(name, module, source, root, labels)
        check_traceable(module, texts)
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
    parser = argparse.ArgumentParser(prog="python -m tsforge.packaging.new", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the model's name: archive, endpoint and declaration module")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                        help="torchvision:NAME, FILE.py:FUNCTION, a TorchScript file, a .pt2 program or a local "
                        "Hugging Face folder (text-classification)")
    parser.add_argument("--weights", help="a state dict for the model (torch.load with weights_only=True)")
    parser.add_argument("--num-classes", type=int, help="torchvision:NAME's output classes (default 1000)")
    parser.add_argument("--labels", help="class names, one per line (image tasks)")
    parser.add_argument("--examples", nargs="+", metavar="IMAGE", help="example images (image-classification; "
                        "default: scikit-learn's two sample photos, from the examples extra)")
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
