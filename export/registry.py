"""All declared models by name, discovered: nothing is listed here.

A declaration is a Python module whose `SPEC` (a ModelSpec) or `SPECS` (several) names its models. They are
found in three places:

- the toolkit's own examples, `export/models/*.py`;
- the user's folder `models/*.py` at the project root (`tsforge new NAME ...` writes one there);
- every folder named in `TSFORGE_MODELS` (separated by `os.pathsep`, `:` on Linux).

Two declarations of one name are an error naming both files.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

from export.spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = Path(__file__).resolve().parent / "models"
USER_FOLDER = "models"
MODELS_ENV = "TSFORGE_MODELS"


class RegistryError(SystemExit):
    """A declaration that cannot be loaded, or two declarations of one name (one line, exit 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")
        self.message = message


def user_folders() -> list[Path]:
    """The folders searched for user declarations, in order: ROOT/models, then TSFORGE_MODELS's."""
    folders = [ROOT / USER_FOLDER]
    folders += [Path(entry).expanduser() for entry in os.environ.get(MODELS_ENV, "").split(os.pathsep) if entry]
    unique: dict[Path, None] = {}
    for folder in folders:
        if folder.is_dir():
            unique.setdefault(folder.resolve(), None)
    return list(unique)


def _specs(module: ModuleType) -> list[ModelSpec]:
    found = list(getattr(module, "SPECS", ()))
    single = getattr(module, "SPEC", None)
    if single is not None and all(single is not spec for spec in found):
        found.append(single)
    return [spec for spec in found if isinstance(spec, ModelSpec)]


def import_file(path: Path, namespace: str = "tsforge_user_models") -> ModuleType:
    """Import a Python file under a name of its own in `namespace` (so two folders may both hold `models/x.py`);
    raises ImportError naming the file and the cause when it cannot be imported."""
    name = f"{namespace}." + re.sub(r"\W", "_", str(path.resolve().with_suffix("")))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ImportError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _load_file(path: Path) -> ModuleType:
    """A user declaration, imported."""
    try:
        return import_file(path)
    except ImportError as exc:
        raise RegistryError(f"cannot load the model declaration: {exc}") from exc


def declarations() -> list[tuple[Path, ModuleType]]:
    """Every declaration module with its file: the built-in ones first, then the user's."""
    found: list[tuple[Path, ModuleType]] = []
    for path in sorted(BUILTIN.glob("*.py")):
        if path.stem != "__init__":
            found.append((path, importlib.import_module(f"export.models.{path.stem}")))
    for folder in user_folders():
        for path in sorted(folder.glob("*.py")):
            if not path.stem.startswith("_"):
                found.append((path, _load_file(path)))
    return found


def discover() -> dict[str, ModelSpec]:
    models: dict[str, ModelSpec] = {}
    where: dict[str, Path] = {}
    for path, module in declarations():
        for spec in _specs(module):
            if spec.name in models and models[spec.name] is not spec:
                raise RegistryError(f"model {spec.name!r} is declared twice: in {where[spec.name]} and in {path}")
            models[spec.name], where[spec.name] = spec, path
    return models


def declared_in(name: str) -> Path | None:
    """The file that declares `name`, or None."""
    for path, module in declarations():
        if any(spec.name == name for spec in _specs(module)):
            return path
    return None


MODELS: dict[str, ModelSpec] = discover()


def get(name: str) -> ModelSpec:
    if name not in MODELS:  # a declaration written (or a TSFORGE_MODELS set) since this module was imported
        MODELS.update(discover())
    try:
        return MODELS[name]
    except KeyError:
        raise SystemExit(f"unknown model {name!r}; declared models: {', '.join(sorted(MODELS))}") from None
