"""Which exports beside fp32 TorchScript a build makes: `tsforge export --variants` and make's `VARIANTS`.

A request is `none`, or a comma-separated union of variant names and two keywords:

    quick   (the default) every variant the model declares but AOTInductor's, which compiles C++ for 30-46 s per
            model on 2 cores: a first `make archive && make serve` should not wait for it
    all     every variant the model declares
    NAME    int8, onnx, onnx-int8, aotinductor: that one, where the model declares it

The declaration (`ModelSpec.variants`) is the upper bound: a name it does not list is skipped with a note, so one
request fits several models.

Each model's build folder records what its export holds (`build/NAME/variants`). The Makefile runs
`python -m tsforge.packaging.wanted` (this module's command line) at parse time and rewrites that record, with the
union of both, only when the request asks for more than it holds: the export is redone then, and not when a later
command asks for less (`make serve` after `make test` rebuilds nothing). `make clean` starts over.

Stdlib only, and so is the `export` package's __init__: the Makefile runs it with the system Python, before the
virtual environment exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

VARIANT_NAMES = ("int8", "onnx", "onnx-int8", "aotinductor")
#: built only when asked for by name or by `all`
ON_REQUEST = ("aotinductor",)
KEYWORDS = ("quick", "all", "none")
DEFAULT = "quick"
RECORD = "variants"


class RequestError(ValueError):
    """A request naming something that is neither a variant nor a keyword."""


def expand(request: str) -> tuple[str, ...]:
    """The variant names a request stands for when a model declares every variant, in VARIANT_NAMES's order."""
    items = [item.strip() for item in request.split(",") if item.strip()]
    if not items:
        raise RequestError(f"empty variants request: expected {' | '.join(KEYWORDS)} or names among "
                           f"{', '.join(VARIANT_NAMES)}")
    chosen: set[str] = set()
    for item in items:
        if item == "all":
            chosen |= set(VARIANT_NAMES)
        elif item == "quick":
            chosen |= set(VARIANT_NAMES) - set(ON_REQUEST)
        elif item in VARIANT_NAMES:
            chosen.add(item)
        elif item != "none":
            raise RequestError(f"unknown variant {item!r}: expected {' | '.join(KEYWORDS)} or names among "
                               f"{', '.join(VARIANT_NAMES)}, comma-separated")
    return tuple(name for name in VARIANT_NAMES if name in chosen)


def resolve(request: str, declared: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the declared variants the request asks for, in the declaration's order; the names it asks for that the
    model does not declare)."""
    asked = expand(request)
    explicit = {item.strip() for item in request.split(",")} & set(VARIANT_NAMES)
    return tuple(v for v in declared if v in asked), tuple(v for v in VARIANT_NAMES if v in explicit - set(declared))


def as_request(names: tuple[str, ...]) -> str:
    return ",".join(names) or "none"


def record(folder: Path, request: str) -> bool:
    """Write `folder/variants` when it is missing or `request` asks for more than it records; True if written."""
    path = folder / RECORD
    wanted = expand(request)
    seed_from_export(folder)
    try:
        held = expand(path.read_text().strip())
    except (OSError, RequestError):
        held = None
    if held is not None and set(wanted) <= set(held):
        return False
    union = set(wanted) | set(held or ())
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(as_request(tuple(n for n in VARIANT_NAMES if n in union)) + "\n")
    return True


def seed_from_export(folder: Path) -> None:
    """An export made before the record existed (or by `tsforge export` alone): record what its export.json holds,
    dated as the export, so that it counts as up to date for what it has and is not redone for nothing."""
    path, report = folder / RECORD, folder / "export.json"
    if path.exists() or not report.is_file():
        return
    try:
        artefacts = json.loads(report.read_text()).get("artefacts") or {}
    except (OSError, ValueError):
        return
    path.write_text(as_request(tuple(n for n in VARIANT_NAMES if n in artefacts)) + "\n")
    stamp = report.stat().st_mtime_ns
    os.utime(path, ns=(stamp, stamp))
