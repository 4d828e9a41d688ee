"""Which variants a build makes (export/wanted.py; make's VARIANTS through tsforge/packaging/wanted.py): the default
leaves AOTInductor out, a request for more redoes the export with the union, one for less redoes nothing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from export import wanted
from export.wanted import RequestError, expand, record, resolve

ROOT = Path(__file__).resolve().parent.parent
DECLARED = ("int8", "onnx", "onnx-int8", "aotinductor")


def test_requests_expand_to_names() -> None:
    assert expand("quick") == ("int8", "onnx", "onnx-int8")
    assert expand("all") == DECLARED
    assert expand("none") == ()
    assert expand("aotinductor,int8") == ("int8", "aotinductor")
    assert expand("quick,aotinductor") == DECLARED
    for bad in ("", "fast", "int8,tensorrt"):
        with pytest.raises(RequestError, match="expected"):
            expand(bad)


def test_the_declaration_bounds_the_request() -> None:
    assert resolve("all", ("int8", "onnx")) == (("int8", "onnx"), ())
    assert resolve("quick", ("int8",)) == (("int8",), ())
    assert resolve("int8,aotinductor", ("int8",)) == (("int8",), ("aotinductor",))  # named but not declared: noted
    assert resolve("none", DECLARED) == ((), ())


def test_the_record_grows_and_never_shrinks(tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    assert record(folder, "quick")  # a first build
    assert (folder / "variants").read_text() == "int8,onnx,onnx-int8\n"
    assert not record(folder, "none") and not record(folder, "int8") and not record(folder, "quick")
    assert record(folder, "aotinductor")  # more: the export is redone with the union
    assert (folder / "variants").read_text() == "int8,onnx,onnx-int8,aotinductor\n"
    assert not record(folder, "quick")  # `make serve` after `make test` rebuilds nothing


def test_an_export_without_a_record_counts_for_what_it_holds(tmp_path: Path) -> None:
    folder = tmp_path / "resnet18"
    folder.mkdir()
    report = folder / "export.json"
    report.write_text(json.dumps({"artefacts": {"int8": {}, "onnx": {}, "onnx-int8": {}, "aotinductor": {}}}))
    os.utime(report, ns=(10**18, 10**18))
    assert not record(folder, "quick")
    assert (folder / "variants").read_text() == "int8,onnx,onnx-int8,aotinductor\n"
    assert (folder / "variants").stat().st_mtime_ns == report.stat().st_mtime_ns  # not newer: no rebuild


def test_make_archive_builds_what_serve_serves_with_the_quick_variants(tmp_path: Path) -> None:
    env_free = {k: v for k, v in os.environ.items() if k != "VARIANTS"}
    done = subprocess.run(["make", "-n", "archive", f"BUILD={tmp_path}", f"STORE={tmp_path / 'store'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env_free)
    assert done.returncode == 0, done.stderr
    exports = [line for line in done.stdout.splitlines() if " tsforge export " in line]
    assert len(exports) == 1 and " export digits " in exports[0], done.stdout
    assert (tmp_path / "digits" / wanted.RECORD).read_text() == "int8,onnx,onnx-int8\n"
    subprocess.run(["make", "-n", "archive", "MODELS=digits resnet18", "VARIANTS=all", f"BUILD={tmp_path}",
                    f"STORE={tmp_path / 'store'}"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                   env=env_free, check=True)
    for name in ("digits", "resnet18"):
        assert (tmp_path / name / wanted.RECORD).read_text() == "int8,onnx,onnx-int8,aotinductor\n"
    subprocess.run(["make", "-n", "test", f"BUILD={tmp_path / 'suite'}", f"STORE={tmp_path / 'store'}"], cwd=ROOT,
                   capture_output=True, text=True, timeout=60, env=env_free, check=True)
    assert (tmp_path / "suite" / "digits" / wanted.RECORD).read_text() == "int8,onnx,onnx-int8,aotinductor\n"
