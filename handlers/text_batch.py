"""What the text handlers share: one text per request, the whole batch tokenized at once.

The embedding handler (handlers/text_handler.py) and the classification handler
(handlers/text_classification_handler.py) differ only in what they do with the model's output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from handlers.base import BatchHandler
from handlers.errors import InvalidInput, PayloadTooLarge
from handlers.payload import as_text


class TextBatchHandler(BatchHandler):
    """`setup` calls `load_tokenizer`; texts longer than `max_seq_length` tokens are truncated, the batch is padded
    to its longest text. `handler.max_chars` (default 20000) bounds a text before tokenizing (413 beyond it);
    empty or blank text is 422."""

    def load_tokenizer(self, max_seq_length: int, pad_token: str = "[PAD]", pad_id: int | None = None) -> None:
        """The archive's tokenizer.json; `pad_id` defaults to the pad token's id in it (0 if it has none)."""
        self.max_chars = int(self.config.get("max_chars", 20_000))
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=int(self.config.get("max_seq_length", max_seq_length)))
        if pad_id is None:
            pad_id = self.tokenizer.token_to_id(pad_token) or 0
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)

    def decode(self, payload: Any) -> str:
        text = as_text(payload)
        if len(text) > self.max_chars:
            raise PayloadTooLarge(f"the text has {len(text)} characters; the limit is {self.max_chars}")
        if not text.strip():
            raise InvalidInput('the text is empty; send a non-empty string, e.g. {"text": "a sentence"}')
        return text

    def collate(self, items: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encodings = self.tokenizer.encode_batch(items)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long, device=self.device)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long, device=self.device)
        return ids, mask

    def unbatch(self, output: torch.Tensor, count: int) -> list[Any]:
        """float32 numpy rows: one copy off the device for the whole batch, and numpy's `tolist` in `encode` is
        one C call per row (the Python work per answer holds a GPU server far below the model's rate)."""
        rows: list[np.ndarray[Any, Any]] = list(output.float().cpu().numpy())
        return rows
