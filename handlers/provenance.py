"""The version file inside every archive, and the hashes that bind a model version to its code.

`version.json` records the archive version, the git commit (and whether the tree was dirty) and the
SHA-256 of every file that shapes an answer: weights, handler modules, labels, config. The archive
tool writes it; `make verify` and the handler at start-up recompute the hashes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

VERSION_FILE = "version.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(root: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256(root / name) for name in sorted(names)}


def read(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / VERSION_FILE).read_text())
    return data


def mismatches(root: Path, record: dict[str, Any]) -> list[str]:
    """Files whose content differs from the record, or that are missing; empty when all agree."""
    problems = []
    for name, expected in record.get("files", {}).items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256(path) != expected:
            problems.append(f"{name}: SHA-256 differs from the version file")
    return problems
