"""Archives bound to their code: `make verify` offline, refusal to load when tampered, version on every answer."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, StartServer, built_archive
from tsforge.packaging import verify
from tsforge.serving.server import TorchServe

Change = Callable[[str, bytes], bytes | None]


def rewrite(src: Path, dst: Path, change: Change, add: dict[str, bytes] | None = None) -> Path:
    """Copy an archive, passing each member through `change` (None drops it) and adding `add`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = change(item.filename, zin.read(item))
            if data is not None:
                zout.writestr(item, data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return dst


def edit(member: str, how: Callable[[bytes], bytes]) -> Callable[[str, bytes], bytes | None]:
    return lambda name, data: how(data) if name == member else data


def other_version(data: bytes) -> bytes:
    manifest = json.loads(data)
    manifest["model"]["modelVersion"] = "9.9"
    return json.dumps(manifest).encode()


TAMPERINGS = {
    "handler_changed": (edit("handlers/base.py", lambda d: d + b"\n# patched\n"), None,
                        "handlers/base.py: SHA-256 differs"),
    "weights_changed": (edit("digits.pt", lambda d: d[:-8] + bytes(8)), None, "digits.pt: SHA-256 differs"),
    "file_added": (lambda name, data: data, {"handlers/extra.py": b"import os\n"}, "handlers/extra.py: not recorded"),
    "file_removed": (lambda name, data: None if name == "index_to_name.json" else data, None,
                     "index_to_name.json: missing"),
    "version_mismatch": (edit("MAR-INF/MANIFEST.json", other_version), None, "the manifest says version 9.9"),
}


@pytest.fixture(scope="module")
def good() -> Path:
    return built_archive("digits")


def test_verify_passes_on_a_built_archive(good: Path) -> None:
    report = verify.verify(good)
    assert report.ok, report.problems
    recorded = json.loads(zipfile.ZipFile(good).read("version.json"))
    assert report.version == recorded["version"] and report.commit == recorded["git_commit"]
    assert verify.main([str(good)]) == 0


@pytest.mark.parametrize("kind", sorted(TAMPERINGS))
def test_verify_reports_a_tampered_archive(good: Path, tmp_path: Path, kind: str) -> None:
    change, add, expected = TAMPERINGS[kind]
    bad = rewrite(good, tmp_path / "digits.mar", change, add)
    report = verify.verify(bad)
    assert not report.ok and any(expected in p for p in report.problems), report.problems
    assert verify.main([str(bad)]) == 1


def test_make_verify_fails_on_a_store_with_one_bad_archive(good: Path, tmp_path: Path) -> None:
    shutil.copy(good, tmp_path / "digits.mar")
    ok = subprocess.run(["make", "-s", "verify", f"STORE={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "ok   digits.mar" in ok.stdout
    rewrite(good, tmp_path / "digits-bad.mar", *TAMPERINGS["handler_changed"][:2])
    bad = subprocess.run(["make", "-s", "verify", f"STORE={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "FAIL digits-bad.mar" in bad.stdout and "ok   digits.mar" in bad.stdout


@pytest.mark.integration
def test_a_tampered_archive_refuses_to_load_and_a_good_one_reports_its_version(
    good: Path, tmp_path_factory: pytest.TempPathFactory, start_server: StartServer
) -> None:
    store = tmp_path_factory.mktemp("store")
    shutil.copy(good, store / "digits.mar")
    rewrite(good, store / "tampered.mar", *TAMPERINGS["handler_changed"][:2])
    server: TorchServe = start_server(["digits"], store=store)
    example = json.loads(zipfile.ZipFile(good).read("examples.json"))[0]
    answer = requests.post(server.url("inference") + "/predictions/digits", json=example["input"], timeout=30)
    version = json.loads(zipfile.ZipFile(good).read("version.json"))["version"]
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == version

    register = requests.post(server.url("management") + "/models", timeout=120,
                             params={"url": "tampered.mar", "model_name": "tampered", "synchronous": "true"})
    assert register.status_code >= 400
    model_log = server.run_dir / "logs" / "model_log.log"
    deadline = time.monotonic() + 10
    while "refusing to load tampered" not in model_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)  # the log appender is asynchronous
    line = next(x for x in model_log.read_text().splitlines() if "refusing to load tampered" in x)
    assert "handlers/base.py: SHA-256 differs from the version file" in line
    requests.delete(server.url("management") + "/models/tampered", timeout=30)
    still = requests.post(server.url("inference") + "/predictions/digits", json=example["input"], timeout=30)
    assert still.status_code == 200
