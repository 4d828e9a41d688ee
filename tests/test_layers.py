"""The import graph of the toolkit's own packages, read with `ast` (nothing is imported, torch least of all):

- no cycle among the modules of export/, handlers/, loadtest/ and tsforge/, imports inside functions included (they
  hide a cycle from Python at import time, not from a reader);
- export/ and handlers/ import nothing from the command-line layers above them (tsforge.packaging, tsforge.serving,
  tsforge.clients, tsforge.kube): handlers/ travels inside every archive, and export/ is what those layers call.

Imports under `if TYPE_CHECKING:` are left out: they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("export", "handlers", "loadtest", "tsforge")
LOWER = ("export", "handlers")
UPPER = ("tsforge.packaging", "tsforge.serving", "tsforge.clients", "tsforge.kube")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == package or name.startswith(f"{package}.") for package in packages)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            yield from (n for child in node.orelse for n in _import_nodes(ast.Module(body=[child], type_ignores=[])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The names `name` imports: a submodule where `from X import Y` names one, else X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {t for t in imported(name, path, known) if t in known and t != name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read() -> None:
    edges = graph()
    assert "export.failures" in edges["export.sources"]
    assert "export.failures" in edges["export.models.detection"]
    assert "handlers.runtimes" in edges["export.variants"]


def test_no_import_cycle() -> None:
    found = cycles(graph())
    assert not found, "import cycles (function-level imports included): " + "; ".join(
        " <-> ".join(component) for component in found)


def test_a_cycle_is_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_export_and_handlers_import_nothing_from_the_layers_above() -> None:
    known = modules()
    upward = sorted(f"{name} imports {target}" for name, path in known.items() if name.split(".")[0] in LOWER
                    for target in imported(name, path, known) if within(target, UPPER))
    assert not upward, "; ".join(upward)
