"""Handler for sequence classifiers (a Hugging Face folder's, export/hf_folder.py): text in, label and top-k out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from handlers import oip
from handlers.base import probability_discrepancy
from handlers.errors import UndecodableInput
from handlers.text_batch import TextBatchHandler


class TextClassificationHandler(TextBatchHandler):
    """Accepts one text per request: a text/plain body, a JSON string, {"text": ...}, {"data": ...} or
    {"inputs": ...}, KServe v1 {"instances": [...]} or a v2 BYTES input. Returns
    `{"label": "positive", "probabilities": {"positive": 0.97, "negative": 0.03}}` with the `handler.top_k` most
    likely classes (default 5); v2 answers carry "probabilities" [N, classes] and "label" [N].

    As the embedding handler does (handlers/text_handler.py), the whole batch is tokenized at once with the
    archive's `tokenizer.json` and padded to its longest text; a text longer than `max_seq_length` tokens (from
    the export's text_classification.json, or the config) is truncated. `handler.max_chars` (default 20000)
    bounds a text before tokenizing (413 beyond it); empty or blank text is 422; what is not UTF-8 text, or opens
    as a JSON object that does not parse, 400.
    """

    default_tolerance = 0.01  # `auto` keeps a variant whose class probabilities move by at most 0.01

    def setup(self) -> None:
        settings = self.read_json("text_classification.json")
        self.labels = self.read_labels()
        self.top_k = min(int(self.config.get("top_k", 5)), len(self.labels))
        self.load_tokenizer(int(settings["max_seq_length"]), str(settings["pad_token"]), int(settings["pad_id"]))
        super().setup()  # measuring variants for `auto` tokenizes the examples

    def decode(self, payload: Any) -> str:
        if isinstance(payload, (bytes, bytearray, str)) and payload[:64].lstrip()[:1] in (b"{", "{"):
            # the base parses a body that opens as a JSON object; one that is still raw here did not parse
            raise UndecodableInput('the body opens as a JSON object but is not valid JSON; expected {"text": '
                                   '"a sentence"} or the text itself')
        return super().decode(payload)

    def infer(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.softmax(self.model(*batch).float(), dim=-1)

    def encode(self, row: np.ndarray[Any, Any]) -> dict[str, Any]:
        top = np.argsort(-row, kind="stable")[: self.top_k]
        return {"label": self.labels[int(top[0])],
                "probabilities": {self.labels[int(i)]: round(float(row[i]), 6) for i in top}}

    def encode_v2(self, rows: Sequence[Any]) -> list[dict[str, Any]]:
        return oip.tensor_outputs(rows, "probabilities", self.labels)

    def discrepancy(self, reference: torch.Tensor, output: torch.Tensor) -> float:
        """Measured on the raw program's logits: the largest change of any class probability."""
        return probability_discrepancy(reference, output)
