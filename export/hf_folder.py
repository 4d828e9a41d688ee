"""A local Hugging Face model folder as a source (`tsforge new NAME --task text-classification --from FOLDER`), and
the text-classification task built on it.

The folder is what `save_pretrained` writes: `config.json`, the weights as `model.safetensors` (never a pickle:
`pytorch_model.bin` is refused) and a fast tokenizer's `tokenizer.json`. It is loaded with transformers,
`local_files_only=True` and the hub switched off: nothing is fetched. The traced program is
(input_ids, attention_mask) -> logits; the archive carries `tokenizer.json`, the labels (`index_to_name.json`, from
the config's `id2label`) and `text_classification.json` (truncation length and padding token), which
`handlers/text_classification_handler.py` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.failures import NewError, short_message
from export.models.minilm import HELDOUT_SENTENCES
from export.spec import ModelSpec, PreparedModel
from tsforge import extras

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
SETTINGS_FILE = "text_classification.json"
HANDLER = "handlers/text_classification_handler.py"
EXPECTED = (f"a local Hugging Face sequence-classifier folder ({CONFIG_FILE} with an *ForSequenceClassification "
            f"architecture, {WEIGHTS_FILE}, {TOKENIZER_FILE}), as save_pretrained writes it")
EXAMPLES = ["What a wonderful, heartfelt film: I loved every minute.",
            "The service was slow and the food arrived cold.",
            "The package arrived on Tuesday."]
TRACE_TEXTS = ["A man is eating food.", "The weather is lovely today, isn't it?"]
CHECK_TEXTS = ["Hi", "Terrible. Just terrible.", "Ünïcödé, emoji 🚀 and numbers 12345 are tokenized too.",
               "TorchScript traces the transformer once; the sequence length must stay free afterwards.", "ok"]
#: the smallest top-1 agreement with fp32 on the held-out texts that a served variant keeps
MIN_AGREEMENT = 0.95
DEFAULT_MAX_LENGTH = 512
#: each declared text classifier's folder, by model name (the bench's stock baseline serves the same files)
FOLDERS: dict[str, Path] = {}


def _error(message: str) -> Exception:
    return NewError(message)


def check_folder(folder: Path) -> dict[str, Any]:
    """The folder's config, once the files a sequence classifier needs are there; else one NewError naming them."""
    if not folder.is_dir():
        raise _error(f"{folder} is not a folder; expected {EXPECTED}")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if not (folder / name).is_file()]
    if missing:
        pickled = " (pytorch_model.bin is a pickle, never loaded: save with safe_serialization=True)" \
            if WEIGHTS_FILE in missing and (folder / "pytorch_model.bin").is_file() else ""
        raise _error(f"{folder} has no {', '.join(missing)}{pickled}; expected {EXPECTED}")
    try:
        config: dict[str, Any] = json.loads((folder / CONFIG_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _error(f"{folder / CONFIG_FILE} is not JSON ({exc}); expected {EXPECTED}") from exc
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise _error(f"{folder / CONFIG_FILE} declares {architectures or 'no architectures'}, not a sequence "
                     f"classifier; expected {EXPECTED}")
    return config


def labels_of(config: dict[str, Any]) -> list[str]:
    id2label = config.get("id2label") or {}
    count = len(id2label) or int(config.get("num_labels", 2))
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count)]


class LogitsOnly(nn.Module):
    """A transformers sequence classifier with positional inputs and a plain tensor output, as tracing wants."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits


def load_classifier(folder: Path) -> LogitsOnly:
    """The folder's model in eval mode, loaded offline; a folder transformers cannot load is one NewError."""
    check_folder(folder)
    os.environ["HF_HUB_OFFLINE"] = "1"  # the folder is local: the hub is never asked, not even for a config
    extras.require("transformers", "examples", "a Hugging Face model folder")
    from transformers import AutoModelForSequenceClassification

    try:
        # Eager attention: traces to plain matmuls (as for MiniLM, export/models/minilm.py)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, attn_implementation="eager")
    except Exception as exc:
        raise _error(f"transformers cannot load {folder} as a sequence classifier ({type(exc).__name__}: "
                     f"{short_message(exc)}); expected {EXPECTED}") from exc
    return LogitsOnly(model).eval()


def settings(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """What the handler needs besides the tokenizer: how long a text may be in tokens and how to pad."""
    limits = [int(config.get("max_position_embeddings") or DEFAULT_MAX_LENGTH)]
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        length = json.loads(tokenizer_config.read_text()).get("model_max_length")
        if isinstance(length, int) and 0 < length < 1_000_000:  # transformers writes 1e30 for "no limit"
            limits.append(length)
    tokenizer = tokenizer_of(folder)
    pad_id = int(config.get("pad_token_id") or 0)
    return {"max_seq_length": min(limits), "pad_id": pad_id, "pad_token": tokenizer.id_to_token(pad_id) or "[PAD]"}


def tokenizer_of(folder: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as exc:
        raise _error(f"{folder / TOKENIZER_FILE} is not a tokenizers file ({exc}); expected {EXPECTED}") from exc


def encode_texts(tokenizer: Any, texts: Sequence[str], setup: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of a batch, padded to its longest text, as the handler does."""
    tokenizer.enable_truncation(max_length=int(setup["max_seq_length"]))
    tokenizer.enable_padding(pad_id=int(setup["pad_id"]), pad_token=str(setup["pad_token"]))
    batch = tokenizer.encode_batch(list(texts))
    return (torch.tensor([e.ids for e in batch], dtype=torch.long),
            torch.tensor([e.attention_mask for e in batch], dtype=torch.long))


def logits_of(module: Callable[..., torch.Tensor], tokenizer: Any, texts: Sequence[str], setup: dict[str, Any],
              chunk: int = 64) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([module(*encode_texts(tokenizer, texts[i : i + chunk], setup)).float()
                          for i in range(0, len(texts), chunk)])


def example_texts(root: Path, name: str) -> list[str]:
    """The examples `new` wrote (or the user put) in examples/NAME/*.txt, one text per file; else EXAMPLES."""
    files = sorted((root / "examples" / name).glob("*.txt"))
    return [f.read_text(encoding="utf-8").strip() for f in files] or list(EXAMPLES)


def prepare(module: nn.Module, folder: Path, examples: list[str], heldout: list[str], about: str) -> PreparedModel:
    """The export of a sequence classifier: traced on two texts, checked on others, labelled from its config."""
    config = check_folder(folder)
    setup = settings(folder, config)
    tokenizer = tokenizer_of(folder)
    labels = labels_of(config)

    def quality(fp32: Callable[..., torch.Tensor], variant: Callable[..., torch.Tensor]) -> dict[str, float]:
        """Top-1 agreement with fp32 and the largest probability change, on the held-out texts."""
        expected, actual = (logits_of(run, tokenizer, heldout, setup) for run in (fp32, variant))
        change = (torch.softmax(actual, -1) - torch.softmax(expected, -1)).abs().max()
        return {"top1_agreement": round(float((expected.argmax(-1) == actual.argmax(-1)).float().mean()), 6),
                "max_probability_change": round(float(change), 6)}

    cases = [{"input": {"text": text}, "expect": {"labels": labels}} for text in examples]
    return PreparedModel(
        module=module,
        example_inputs=encode_texts(tokenizer, TRACE_TEXTS, setup),
        check_inputs=encode_texts(tokenizer, CHECK_TEXTS + examples, setup),
        labels=labels,
        calibration=encode_texts(tokenizer, TRACE_TEXTS + examples, setup),
        quality=quality,
        extra_files={TOKENIZER_FILE: (folder / TOKENIZER_FILE).read_bytes(),
                     SETTINGS_FILE: (json.dumps(setup, indent=2) + "\n").encode(),
                     "examples.json": json.dumps(cases, indent=1).encode()},
        metrics={"classes": float(len(labels)), "max_seq_length": float(setup["max_seq_length"])},
        heldout=[{"text": text} for text in heldout],
        heldout_about=about,
    )


def int8_bound(minimum: float) -> Callable[[dict[str, float]], tuple[bool, str]]:
    def bound(metrics: dict[str, float]) -> tuple[bool, str]:
        return metrics["top1_agreement"] >= minimum, f"top-1 agreement with fp32 on the held-out texts >= {minimum}"
    return bound


def build_text(name: str, source: Any, root: Path) -> PreparedModel:
    module, _ = source.load(root)
    about = f"{len(HELDOUT_SENTENCES)} sentences of varied topics, lengths and languages"
    return prepare(module, root / source.spec, example_texts(root, name), list(HELDOUT_SENTENCES), about)


def text_classification(name: str, source: Any, *, root: Path, variants: tuple[str, ...] = (),
                        revision: int = 1, minimum: float = MIN_AGREEMENT,
                        factory: Callable[[], PreparedModel] | None = None) -> ModelSpec:
    """The declaration of a text classifier from a Hugging Face folder (what models/NAME.py calls); `factory`
    replaces the default preparation (the sentiment example brings its own held-out texts).

    No variant by default: bf16 runs the fp32 program under autocast where the CPU has it natively, checked by
    the accuracy gate at worker start. Dynamic int8 (`variants=("int8",)`) searched 38 Linear layers for 237 s on
    2 busy cores for the sentiment example and kept top-1 agreement 0.970 on its held-out texts, with a class
    probability moving by up to 0.30: not worth building by default."""
    FOLDERS[name] = root / source.spec
    return ModelSpec(name=name, revision=revision, factory=factory or partial(build_text, name, source, root),
                     handler=HANDLER, tolerance=1e-4, variants=variants, int8="dynamic",
                     int8_bound=int8_bound(minimum), accuracy=("top1_agreement", minimum),
                     description=f"text classifier from {source.spec}")


def text_config(name: str, labels: list[str], max_length: int) -> str:
    """config/models/NAME.yaml for a text classifier (tsforge new, and the sentiment example's)."""
    return f"""# TorchServe model-config.yaml for {name} (packaged as model-config.yaml).
minWorkers: 1
maxWorkers: 1
batchSize: 16
maxBatchDelay: 10       # ms to wait for a batch to fill; texts of a batch are padded to the longest
responseTimeout: 60     # s
handler:
  max_chars: 20000      # longer texts are answered with 413
  # max_seq_length: {max_length} # tokens kept per text (longer texts are truncated); default from the export
  top_k: {min(5, len(labels))}              # classes in each answer's "probabilities"
  # bf16/fp16 run the fp32 program under autocast (the traced attention mask is pinned to fp32)
  reduced_precision: autocast
# Open Inference Protocol tensors, as `make serve`'s v2 front (tsforge/serving/front.py) describes them to clients
v2:
  inputs:
    - {{name: text, datatype: BYTES, shape: [-1]}}
  outputs:
    - {{name: probabilities, datatype: FP32, shape: [-1, {len(labels)}]}}
    - {{name: label, datatype: BYTES, shape: [-1]}}
"""


def new_files(name: str, module: nn.Module, source: Any, root: Path, labels: str | None
              ) -> tuple[str, dict[Path, bytes], tuple[torch.Tensor, torch.Tensor]]:
    """`tsforge new --task text-classification`: the model checked on the example texts (logits, one per label of
    its config), its config/models/NAME.yaml, the example texts, and the inputs to check tracing on."""
    if source.kind != "hf-folder":
        raise _error(f"text-classification takes its model, tokenizer and labels from {EXPECTED}; got {source.spec}")
    if labels:
        raise _error("--labels is for image tasks; a text classifier's labels are its config.json's id2label")
    folder = root / source.spec
    config = check_folder(folder)
    names = labels_of(config)
    setup = settings(folder, config)
    inputs = encode_texts(tokenizer_of(folder), EXAMPLES, setup)
    try:
        with torch.inference_mode():
            logits = module(*inputs)
    except Exception as exc:
        raise _error(f"the model failed on the example texts (expected {EXPECTED}): {type(exc).__name__}: "
                     f"{short_message(exc)}") from exc
    if tuple(logits.shape) != (len(EXAMPLES), len(names)):
        raise _error(f"the model returned logits of shape {tuple(logits.shape)} for {len(EXAMPLES)} texts; expected "
                     f"[{len(EXAMPLES)}, {len(names)}], one per label of config.json's id2label")
    examples = root / "examples" / name
    contents = {examples / f"text{i}.txt": (text + "\n").encode() for i, text in enumerate(EXAMPLES)}
    return text_config(name, names, int(setup["max_seq_length"])), contents, inputs
