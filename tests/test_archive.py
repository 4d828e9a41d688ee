"""Archive: the manifest and the version file agree, every file is inside, and a rebuild is a no-op."""

from __future__ import annotations

import json
import subprocess
import zipfile

from handlers.provenance import sha256
from tests.conftest import BUILD, ROOT, built_archive
from tsforge.project import archive_version, git_state

EXPECTED = {"digits.pt", "digits_handler.py", "model-config.yaml", "version.json", "index_to_name.json",
            "export.json", "examples.json", "handlers/__init__.py", "handlers/base.py", "handlers/payload.py",
            "handlers/errors.py", "handlers/images.py", "handlers/telemetry.py", "handlers/provenance.py"}


def test_manifest_version_matches_version_file_and_all_files_are_inside(tmp_path) -> None:
    mar = built_archive("digits")
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        archive.extractall(tmp_path)
    record = json.loads((tmp_path / "version.json").read_text())
    assert names >= EXPECTED
    assert manifest["model"]["modelVersion"] == record["version"] == archive_version(1)
    assert manifest["model"]["handler"] == "digits_handler.py"
    assert record["git_commit"] == git_state().commit
    assert set(record["files"]) >= EXPECTED - {"version.json"}
    for name, digest in record["files"].items():
        assert sha256(tmp_path / name) == digest, name
    assert record["files"]["digits.pt"] == sha256(BUILD / "digits" / "digits.pt")


def test_rerunning_archive_does_no_work() -> None:
    built_archive("digits")
    question = subprocess.run(["make", "--question", "model_store/digits.mar", "MODELS=digits"], cwd=ROOT)
    assert question.returncode == 0, "make archive would rebuild although nothing changed"
    dry_run = subprocess.run(["make", "-n", "archive", "MODELS=digits"], cwd=ROOT, capture_output=True, text=True)
    assert "tsforge archive" not in dry_run.stdout and "tsforge.packaging.archive" not in dry_run.stdout
