"""Check archives offline against their version files: `make verify` (every archive in the store).

    python -m tsforge.packaging.verify [model_store/digits.mar ...] [--store model_store]

For each `.mar`: every recorded file is present with the recorded SHA-256, no unrecorded file rides
along, and the manifest's version equals `version.json`'s. The handler runs the same check when a
worker starts, so an archive that fails here also refuses to load in TorchServe. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handlers import provenance
from tsforge.project import ROOT

MANIFEST = "MAR-INF/MANIFEST.json"


@dataclass(frozen=True)
class Report:
    archive: Path
    version: str | None
    commit: str | None
    dirty: bool | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if not self.ok:
            return f"FAIL {self.archive.name}: " + "; ".join(self.problems)
        state = "dirty tree" if self.dirty else "clean tree"
        return f"ok   {self.archive.name}: version {self.version}, commit {(self.commit or '?')[:12]} ({state})"


def _safe_extract(archive: zipfile.ZipFile, into: Path) -> None:
    for member in archive.namelist():
        target = (into / member).resolve()
        if not target.is_relative_to(into.resolve()):
            raise ValueError(f"member {member!r} points outside the archive")
    archive.extractall(into)


def verify(mar: Path) -> Report:
    """Unpack `mar` into a scratch folder and compare it with its version file."""
    try:
        with tempfile.TemporaryDirectory(prefix="tsforge-verify-") as scratch, zipfile.ZipFile(mar) as archive:
            root = Path(scratch)
            _safe_extract(archive, root)
            manifest: dict[str, Any] = json.loads((root / MANIFEST).read_text()) if (root / MANIFEST).is_file() else {}
            found = provenance.problems(root, (manifest.get("model") or {}).get("modelVersion"))
            record = provenance.read(root) if (root / provenance.VERSION_FILE).is_file() else {}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        return Report(mar, None, None, None, [f"unreadable archive: {exc}"])
    return Report(mar, record.get("version"), record.get("git_commit"), record.get("git_dirty"), found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.packaging.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archives", nargs="*", type=Path, help="archives to check (default: every .mar in --store)")
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    args = parser.parse_args(argv)
    archives = args.archives or sorted(args.store.glob("*.mar"))
    if not archives:
        print(f"no archives in {args.store}", file=sys.stderr)
        return 1
    reports = [verify(mar) for mar in archives]
    for report in reports:
        print(report.line())
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
