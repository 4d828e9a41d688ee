"""The stock baseline for text classifiers (`make bench MODEL=sentiment`, target stock).

TorchServe's stock `text_classifier` cannot serve a Hugging Face classifier: it needs torchtext (no release for
torch 2.x on PyPI) and a vocabulary pickled with it, and feeds the model one tensor of token ids, not
(input_ids, attention_mask). What TorchServe users ran for Hugging Face classifiers is pytorch/serve's example
`examples/Huggingface_Transformers/Transformer_handler_generalized.py` (Apache-2.0). This module does what that
example does for `mode: sequence_classification, save_mode: pretrained`, written here rather than vendored:

- the model: `AutoModelForSequenceClassification.from_pretrained(model_dir)`, eager, fp32, the same folder files
  (config.json, model.safetensors, the tokenizer) the tsforge archive was exported from;
- each request's text (`data` or `body`, bytes decoded as UTF-8) is tokenized on its own with transformers'
  tokenizer (`encode_plus` there, its one-text call here: transformers 5 removed encode_plus), padded to
  `max_length` from setup_config.json (150 in the example's sample config), logged, and the batch concatenated;
- the answer is the top label's name from index_to_name.json, as a bare string; no probabilities;
- a bad request (not UTF-8, empty) raises, and TorchServe fails the whole batch with one 503.

Two deviations, both in the baseline's favour and neither changing an answer: the tokenizer loads from the archive
(the example's check for a vocabulary looks in the worker's working directory, misses, and asks the hub for
`model_name`, which is refused offline), and the per-batch `print` of the model's raw output is left out.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

log = logging.getLogger(__name__)


class StockTextClassifier(BaseHandler):  # type: ignore[misc]
    def initialize(self, context: Any) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_dir = context.system_properties.get("model_dir")
        gpu = context.system_properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu}" if torch.cuda.is_available() and gpu is not None else "cpu")
        with open(os.path.join(model_dir, "setup_config.json")) as file:
            self.setup_config = json.load(file)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True,
                                                       do_lower_case=self.setup_config["do_lower_case"])
        with open(os.path.join(model_dir, "index_to_name.json")) as file:
            self.mapping = json.load(file)
        self.initialized = True

    def preprocess(self, requests: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, masks = [], []
        for data in requests:
            text = data.get("data")
            if text is None:
                text = data.get("body")
            if isinstance(text, (bytes, bytearray)):
                text = text.decode("utf-8")
            log.info("Received text: '%s'", text)
            # encode_plus, as the example calls it, is gone from transformers 5: the tokenizer's call on one text
            inputs = self.tokenizer(text, max_length=int(self.setup_config["max_length"]), padding="max_length",
                                    truncation=True, add_special_tokens=True, return_tensors="pt")
            ids.append(inputs["input_ids"])
            masks.append(inputs["attention_mask"])
        return torch.cat(ids).to(self.device), torch.cat(masks).to(self.device)

    def inference(self, data: tuple[torch.Tensor, torch.Tensor], *args: Any, **kwargs: Any) -> list[str]:
        input_ids, attention_mask = data
        logits = self.model(input_ids, attention_mask)[0]
        return [self.mapping[str(int(row.argmax()))] for row in logits]

    def postprocess(self, data: list[str]) -> list[str]:
        return data


def setup_config(max_length: int = 150) -> dict[str, Any]:
    """The example's setup_config.json for a sequence classifier saved with save_pretrained."""
    return {"model_name": ".", "mode": "sequence_classification", "do_lower_case": True, "num_labels": "2",
            "save_mode": "pretrained", "max_length": str(max_length), "captum_explanation": False,
            "embedding_name": "bert"}
