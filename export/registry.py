"""All declared models by name. To add one, write a module in export/models/ and list its SPEC here."""

from __future__ import annotations

from export.models import digits, digits_tensor, minilm, resnet
from export.spec import ModelSpec

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    digits.SPEC, digits_tensor.SPEC, minilm.SPEC,
    resnet.RESNET18, resnet.RESNET50,
)}


def get(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise SystemExit(f"unknown model {name!r}; declared models: {', '.join(sorted(MODELS))}") from None
