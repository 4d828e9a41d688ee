"""Every function fits on a screen: at most 60 lines from its first decorator (or `def`) to its last line, in the
packages that already keep to it. handlers/ (gpu_images.read_jpeg_header) and tsforge/ (packaging/new.create) do
not yet, so they are not checked; add them here once they do."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

MAX_LINES = 60
CHECKED = ("loadtest", "export")


def long_functions(folder: Path, limit: int = MAX_LINES) -> list[str]:
    """`path:line name (N lines)` for each function or method under `folder` longer than `limit` lines."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = (node.end_lineno or node.lineno) - first + 1
                if lines > limit:
                    found.append(f"{path.relative_to(ROOT)}:{first} {node.name} ({lines} lines)")
    return found


@pytest.mark.parametrize("package", CHECKED)
def test_every_function_fits_on_a_screen(package: str) -> None:
    assert long_functions(ROOT / package) == [], f"split these into named steps of <= {MAX_LINES} lines"


def test_the_check_counts_decorators_signature_and_body(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.test_code_shape.ROOT", tmp_path)

    def source(name: str, body_lines: int) -> str:  # a decorator, a two-line signature, the body
        return (f"class A:\n    @staticmethod\n    async def {name}(\n            a: int) -> None:\n"
                + "".join(f"        x{n} = {n}\n" for n in range(body_lines)))

    (tmp_path / "fits.py").write_text(source("fits", MAX_LINES - 3))
    (tmp_path / "long.py").write_text(source("long", MAX_LINES - 2))
    assert long_functions(tmp_path) == [f"long.py:2 long ({MAX_LINES + 1} lines)"]
