"""Handler for any single-input, single-output TorchScript model: a tensor in, a tensor out.

The input is declared in the archive's model-config.yaml, `handler:` section:

    handler:
      input: {shape: [1, 8, 8], dtype: float32}   # one item, without the batch dimension; -1 = any size
      casting: safe            # numpy casting rule for typed payloads (.npy, v2): no, equiv, safe, same_kind
      max_elements: 4194304    # larger inputs are answered with 413
      v2_output: logits        # the output's name in Open Inference Protocol answers
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from handlers import oip
from handlers.base import BatchHandler
from handlers.errors import InvalidInput, PayloadTooLarge
from handlers.payload import as_array, is_numeric_json, unwrap

CASTING_RULES = ("no", "equiv", "safe", "same_kind")


class TensorHandler(BatchHandler):
    """Accepts one item per request as JSON nested lists, or .npy bytes raw or base64 (also inside
    {"data": ...}); several as {"instances": [...]}; v2 inputs shaped like one item or with a leading batch
    dimension. The shape and dtype are checked against the declared input; the answer is
    `{"output": nested list, "shape": [...], "dtype": "float32"}`."""

    # Raw tensors out: served exactly as exported unless the config asks otherwise.
    default_precision = "fp32"
    default_backend = "torchscript"
    default_fusion = "false"

    def setup(self) -> None:
        spec = self.config.get("input")
        if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
            raise ValueError("model-config.yaml needs handler.input: {shape: [...], dtype: ...}")
        self.input_shape = tuple(int(d) for d in spec["shape"])
        self.input_dtype = np.dtype(str(spec.get("dtype", "float32")))
        self.casting = str(self.config.get("casting", "safe"))
        if self.casting not in CASTING_RULES:
            raise ValueError(f"handler.casting must be one of {CASTING_RULES}; got {self.casting!r}")
        self.max_elements = int(self.config.get("max_elements", 1 << 22))
        super().setup()

    @property
    def expected(self) -> str:
        free = " (-1: any size)" if -1 in self.input_shape else ""
        return f"shape {list(self.input_shape)}{free}, dtype {self.input_dtype}"

    # ---- decoding ----------------------------------------------------------------------------
    def decode(self, payload: Any) -> torch.Tensor:
        payload = unwrap(payload)
        array = self._from_json(payload) if is_numeric_json(payload) else self._typed(as_array(payload))
        return self._checked(array)

    def decode_v2(self, request: oip.InferRequest) -> list[Any]:
        tensor = request.only_input()
        if not isinstance(tensor.data, np.ndarray):
            raise InvalidInput(f"input {tensor.name!r} is BYTES; this model takes a numeric tensor of {self.expected}")
        array = self._typed(tensor.data, f"input {tensor.name!r}")
        if array.ndim == len(self.input_shape) + 1:  # a leading batch dimension
            return [self._checked(item, f"input {tensor.name!r} item {n}") for n, item in enumerate(array)]
        return [self._checked(array, f"input {tensor.name!r}")]

    def _from_json(self, payload: Any) -> np.ndarray[Any, Any]:
        if self.input_dtype.kind == "f":
            return as_array(payload, self.input_dtype)
        array = as_array(payload, np.float64)
        if self.input_dtype.kind in "iu" and not (np.mod(array, 1) == 0).all():
            raise InvalidInput(f"expected integers for dtype {self.input_dtype}; got fractional numbers")
        limits = np.iinfo(self.input_dtype) if self.input_dtype.kind in "iu" else None
        if limits is not None and array.size and (array.min() < limits.min or array.max() > limits.max):
            raise InvalidInput(f"values out of range for dtype {self.input_dtype}")
        return array.astype(self.input_dtype)

    def _typed(self, array: np.ndarray[Any, Any], where: str = "the array") -> np.ndarray[Any, Any]:
        """A payload that carries its own dtype (.npy, v2) must cast to the declared one under `casting`."""
        if not np.can_cast(array.dtype, self.input_dtype, casting=self.casting):  # type: ignore[arg-type]
            raise InvalidInput(f"{where} has dtype {array.dtype}; expected {self.input_dtype} (or one that casts "
                               f"to it under the {self.casting!r} rule)")
        return array.astype(self.input_dtype, copy=False)

    def _checked(self, array: np.ndarray[Any, Any], where: str = "the array") -> torch.Tensor:
        if array.size > self.max_elements:
            raise PayloadTooLarge(f"{where} has {array.size} elements; the limit is {self.max_elements}")
        shape = tuple(array.shape)
        fits = len(shape) == len(self.input_shape) and all(
            want in (-1, got) for want, got in zip(self.input_shape, shape, strict=True))
        if not fits:
            raise InvalidInput(f"{where} has shape {list(shape)}; expected {self.expected}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidInput(f"{where} holds NaN or infinite values")
        return torch.from_numpy(np.ascontiguousarray(array))

    # ---- inference ---------------------------------------------------------------------------
    def collate(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        return items  # batched per shape in `infer`: free (-1) dimensions may differ between requests

    def infer(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        rows: list[torch.Tensor] = [torch.empty(0)] * len(items)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(items):
            by_shape.setdefault(tuple(item.shape), []).append(i)
        for positions in by_shape.values():
            output = self.model(super().collate([items[i] for i in positions]))
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"the model returned {type(output).__name__}; this handler serves one tensor output")
            if output.dtype == torch.bfloat16:  # numpy and JSON have no bfloat16
                output = output.float()
            for i, row in zip(positions, output.cpu().unbind(0), strict=True):
                rows[i] = row
        return rows

    def encode(self, row: torch.Tensor) -> dict[str, Any]:
        return {"output": row.tolist(), "shape": list(row.shape), "dtype": str(row.dtype).removeprefix("torch.")}

