"""How a declaration's failures read, shared by export/sources.py and the task modules it builds on
(export/hf_folder.py, export/models/detection.py): one `NewError` line naming what was expected.

It imports nothing of export/, so every side imports it and none imports another back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class NewError(Exception):
    """Bad input to `tsforge new` (or to a declaration it wrote): one line, exit 2."""


def short_message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def existing_file(root: Path, name: str, what: str) -> Path:
    path = root / name
    if not path.is_file():
        raise NewError(f"{what} {path} does not exist")
    return path


def run_once(module: torch.nn.Module, batch: torch.Tensor, expected: str) -> Any:
    """The model's output on one example batch; a failure is one NewError naming what the task expects."""
    try:
        with torch.inference_mode():
            return module(batch)
    except Exception as exc:
        raise NewError(f"{expected}; it failed on one: {type(exc).__name__}: {short_message(exc)}") from exc
