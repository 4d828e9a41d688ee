"""Declare a PyTorch model once; trace it to TorchScript with a parity check.

Public surface:
    ModelSpec      -- what a model is (name, revision, factory, example input, handler)
    export_model   -- trace, check parity, write the TorchScript file and its report
    MODELS         -- the declared models, by name

Importing the package imports nothing else (its names come from export.spec when first read): the Makefile runs
`python -m tsforge.packaging.wanted`, which reads export/wanted.py, with the system Python, which has no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from export.spec import ExportError, ExportReport, ModelSpec, PreparedModel

__all__ = ["ExportError", "ExportReport", "ModelSpec", "PreparedModel"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("export.spec"), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
