"""Handler for sentence-embedding transformers (MiniLM): text in, one L2-normalised vector out."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from handlers.text_batch import TextBatchHandler


class TextEmbeddingHandler(TextBatchHandler):
    """Accepts one text per request: a text/plain body, a JSON string, {"text": ...}, {"data": ...} or
    {"inputs": ...}, KServe v1 {"instances": [...]} or a v2 BYTES input. Returns
    `{"embedding": [384 floats], "dim": 384}`: the mean of the token embeddings over the attention mask,
    L2-normalised (as sentence-transformers' `encode` with its Normalize module), so the dot product of two
    embeddings is their cosine similarity.

    The whole batch is tokenized at once and padded to its longest text; texts longer than the model's
    `max_seq_length` tokens are truncated. `handler.max_chars` (default 20000) bounds a text before
    tokenizing (413 beyond it); empty or blank text is 422.
    """

    default_tolerance = 0.01  # `auto` keeps a variant whose token embeddings have cosine >= 0.99 to fp32's

    def setup(self) -> None:
        settings = self.read_json("embedding.json")
        self.dimension = int(settings["dimension"])
        self.normalize = bool(settings.get("normalize", True))
        self.load_tokenizer(int(settings["max_seq_length"]))
        super().setup()  # measuring variants for `auto` tokenizes the examples

    def infer(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch
        tokens = self.model(ids, mask).float()
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled

    def encode(self, row: np.ndarray[Any, Any] | torch.Tensor) -> dict[str, Any]:
        return {"embedding": row.tolist(), "dim": int(row.shape[0])}

    def discrepancy(self, reference: torch.Tensor, output: torch.Tensor) -> float:
        """1 - the smallest cosine similarity between a token's embedding and fp32's."""
        cosine = torch.nn.functional.cosine_similarity(output.float().flatten(0, -2),
                                                       reference.float().flatten(0, -2), dim=-1)
        return 1.0 - float(cosine.min())
