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


#: files every archive holds besides the recorded ones: TorchServe's manifest and the version file itself
UNRECORDED_OK = (VERSION_FILE, "MAR-INF/MANIFEST.json")


def unrecorded(root: Path, record: dict[str, Any]) -> list[str]:
    """Files in the archive that the version file does not know of (bytecode caches aside)."""
    known = set(record.get("files", {})) | set(UNRECORDED_OK)
    extra = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name not in known and "__pycache__/" not in name:
            extra.append(f"{name}: not recorded in the version file")
    return extra


def problems(root: Path, manifest_version: str | None) -> list[str]:
    """Everything that makes the unpacked archive at `root` differ from its version file; empty when it agrees."""
    if not (root / VERSION_FILE).is_file():
        return [f"{VERSION_FILE} is missing: the archive was not built by tsforge.packaging.archive"]
    record = read(root)
    found = mismatches(root, record) + unrecorded(root, record)
    if manifest_version is not None and str(record.get("version")) != str(manifest_version):
        found.append(f"the manifest says version {manifest_version}, {VERSION_FILE} says {record.get('version')}")
    return found
