"""The digits CNN again, served as a plain tensor model: a float32 [1, 8, 8] array in, 10 logits out.

It shows `handlers/tensor_handler.py`, which serves any single-input TorchScript model whose input
shape and dtype are declared in `config/models/digits_tensor.yaml`. Training is deterministic, so
this archive holds the same weights as `digits`.
"""

from __future__ import annotations

import json

from export.models import digits
from export.spec import ModelSpec, PreparedModel


def prepare() -> PreparedModel:
    prepared = digits.train()
    _, _, x_test, _ = digits.load_split()
    cases = [{"input": {"data": digits.to_tensor(x_test[i : i + 1])[0].tolist()}, "expect": {"shape": [10]}}
             for i in range(3)]
    prepared.labels = None  # tensors in, logits out: no label file
    prepared.extra_files = {"examples.json": json.dumps(cases).encode()}
    arrays = digits.to_tensor(x_test).numpy().round(6)  # k/255 to 6 places: the same input for fp32 and variant
    prepared.heldout = [{"data": array.tolist()} for array in arrays]
    prepared.heldout_about = f"the {len(x_test)} held-out digits of the fixed split, as [1, 8, 8] arrays"
    return prepared


SPEC = ModelSpec(
    name="digits_tensor",
    revision=1,
    factory=prepare,
    handler="handlers/tensor_handler.py",
    accuracy=("top1_agreement", digits.MIN_TOP1_AGREEMENT),
    description="the digits CNN as a raw tensor model (logits out) for the generic tensor handler",
)
