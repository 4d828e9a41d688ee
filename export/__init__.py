"""Declare a PyTorch model once; trace it to TorchScript with a parity check.

Public surface:
    ModelSpec      -- what a model is (name, revision, factory, example input, handler)
    export_model   -- trace, check parity, write the TorchScript file and its report
    MODELS         -- the declared models, by name
"""

from export.spec import ExportError, ExportReport, ModelSpec, PreparedModel

__all__ = ["ExportError", "ExportReport", "ModelSpec", "PreparedModel"]
