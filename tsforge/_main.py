"""`tsforge` (the console script) and `python -m tsforge`: one command line over the toolkit's modules.

    tsforge --help                      every command, one line each
    tsforge COMMAND --help              that command's own options
    tsforge archive digits              = python -m tsforge.packaging.archive digits
    tsforge serve --models digits       = python -m tsforge.serving.server start --models digits

Each command runs the `main(argv)` of the module that implements it (COMMANDS below) with the rest of the
command line, some with a fixed first argument (`serve` -> `tsforge.serving.server start`). Only that module is
imported, and only when its command runs: `tsforge stop` does not import torch.

Exit codes: the command's own; 2 for bad arguments (an unknown command, a bad option: one line on stderr) and
for a missing dependency (one line naming the package and the pip command); 1 for a failure of a known kind
(TorchServe not running or not starting, a missing file, a failed subprocess, the project's own errors: one
line, `tsforge COMMAND: error: ...`); 130 on Ctrl-C. Any other exception is a bug and shows its traceback;
TSFORGE_TRACEBACK=1 shows the traceback of known failures too.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NoReturn

from tsforge import extras

PROG = "tsforge"
OWN_PACKAGES = frozenset({"tsforge", "handlers", "export", "loadtest"})


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # whose main(argv) runs the command
    help: str
    group: str
    prefix: tuple[str, ...] = ()  # arguments put before the user's (the module's own sub-action)

    @property
    def runs(self) -> str:
        """The `python -m` line this command stands for."""
        module = self.module.removesuffix(".__main__")
        return " ".join(["python -m", module, *self.prefix])


GROUPS = ("models", "serving", "rollout", "load tests and benchmarks", "packaging")

COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("new", "tsforge.packaging.new",
            "declare your own model (torchvision, a factory, TorchScript, .pt2) for a task, "
            "with its config and example inputs", "models"),
    Command("export", "export.__main__", "trace declared models to TorchScript with a parity check, and their "
            "int8/ONNX/AOTInductor variants", "models"),
    Command("archive", "tsforge.packaging.archive",
            "package exported models into model_store/NAME.mar with a version file",
            "models"),
    Command("verify", "tsforge.packaging.verify", "check archives offline against their version files", "models"),
    Command("serve", "tsforge.serving.server", "start TorchServe (and the v2 front) with models; returns once ready",
            "serving", ("start",)),
    Command("stop", "tsforge.serving.server", "stop the TorchServe that `serve` started", "serving", ("stop",)),
    Command("status", "tsforge.serving.server",
            "say whether TorchServe runs (exit 1 when not)", "serving", ("status",)),
    Command("predict", "tsforge.clients.predict", "send a model's example inputs (or a file) to the running server",
            "serving"),
    Command("grpc", "tsforge.clients.grpc_client", "ping or predict over TorchServe's own gRPC services", "serving"),
    Command("grpc-stubs", "tsforge.clients.grpc_stubs", "generate the gRPC stubs from the protos in TorchServe's jar",
            "serving"),
    Command("metrics", "tsforge.serving.metrics", "health, per-model readiness and the important Prometheus metrics",
            "serving"),
    Command("front", "tsforge.serving.front", "run the Open Inference Protocol (v2) front on its own (serve starts it)",
            "serving"),
    Command("pod", "tsforge.serving.pod",
            "what a KServe pod runs: TorchServe on loopback, the v2 front on the pod's ports",
            "serving"),
    Command("deploy", "tsforge.clients.deploy", "roll a model out to a version: register, smoke-test, make default",
            "rollout", ("deploy",)),
    Command("rollback", "tsforge.clients.deploy",
            "make a model's previous default version the default again", "rollout",
            ("rollback",)),
    Command("undeploy", "tsforge.clients.deploy", "unregister a version that is not the default", "rollout",
            ("undeploy",)),
    Command("deploy-status", "tsforge.clients.deploy", "a model's versions, default, workers and deploy history",
            "rollout", ("status",)),
    Command("loadtest", "loadtest.run", "headless load run (locust or loadgen) with reports",
            "load tests and benchmarks"),
    Command("loadgen", "loadtest.loadgen", "closed-loop load generator against a running server",
            "load tests and benchmarks"),
    Command("bench", "loadtest.bench", "tsforge vs stock handler vs Flask vs in-process ceiling",
            "load tests and benchmarks"),
    Command("bench-gpu", "loadtest.gpu_bench", "GPU: tsforge vs stock handler vs in-process ceiling",
            "load tests and benchmarks"),
    Command("bench-front", "loadtest.front_cost", "what the v2 front costs: v2 requests direct vs through it",
            "load tests and benchmarks"),
    Command("bench-startup", "loadtest.startup", "worker start with auto: the first worker measuring, one more "
            "reusing its choice", "load tests and benchmarks"),
    Command("tune", "loadtest.tune", "sweep workers x batch x delay x threads under a P99 bound",
            "load tests and benchmarks"),
    Command("soak", "loadtest.soak", "long closed-loop runs with the RSS of every process sampled",
            "load tests and benchmarks"),
    Command("render", "loadtest.render", "render bench and tune reports as docs/benchmarks.md",
            "load tests and benchmarks"),
    Command("kserve", "tsforge.kube.kserve", "write a KServe bundle (storage layout, InferenceServices)", "packaging"),
    Command("release", "tsforge.packaging.release",
            "check that a release tag names pyproject's version (check-tag TAG)",
            "packaging"),
]}


def _grpc_stubs_main(module: ModuleType, argv: list[str]) -> int:
    """tsforge.clients.grpc_stubs has no main(argv) of its own: its `python -m` entry only generates."""
    parser = argparse.ArgumentParser(prog="python -m tsforge.clients.grpc_stubs", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print(f"gRPC stubs in {module.generate()}")
    return 0


# Modules whose `python -m` entry is not a main(argv): how to run them.
ADAPTERS: dict[str, Callable[[ModuleType, list[str]], int]] = {"tsforge.clients.grpc_stubs": _grpc_stubs_main}


def usage() -> str:
    return f"usage: {PROG} [-h] [--version] COMMAND [ARGS ...]"


def help_text() -> str:
    width = max(len(name) for name in COMMANDS) + 2
    lines = [usage(), "", "Take a PyTorch model to a fast, safe, observable TorchServe deployment."]
    for group in GROUPS:
        lines += ["", f"{group}:"]
        lines += [f"  {c.name:<{width}}{c.help}" for c in COMMANDS.values() if c.group == group]
    lines += ["", f"`{PROG} COMMAND --help` shows a command's own options; `{PROG} help COMMAND` does too.",
              "The Makefile's targets run these as `python -m tsforge COMMAND ...` (`make help` lists them)."]
    return "\n".join(lines)


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("tsforge")
    except metadata.PackageNotFoundError:
        from tsforge.project import project_version

        return project_version()


def fail(message: str, code: int = 2, prog: str = PROG) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        return dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # the reader went away (`tsforge --help | head`): no traceback, no error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def dispatch(args: list[str]) -> int:
    if not args:
        print(help_text(), file=sys.stderr)
        return fail("a command is required")
    first, rest = args[0], args[1:]
    if first in ("-h", "--help"):
        print(help_text())
        return 0
    if first == "--version":
        print(f"{PROG} {version()}")
        return 0
    if first == "help":
        if not rest:
            print(help_text())
            return 0
        first, rest = rest[0], ["--help"]
    if first.startswith("-"):
        return fail(f"unknown option {first!r} before the command ({usage()})")
    command = COMMANDS.get(first)
    if command is None:
        close = difflib.get_close_matches(first, COMMANDS, n=1, cutoff=0.7)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return fail(f"unknown command {first!r}{hint} (`{PROG} --help` lists the commands)")
    return run(command, rest)


def run(command: Command, argv: list[str]) -> int:
    prog = f"{PROG} {command.name}"
    options = argv[:argv.index("--")] if "--" in argv else argv
    if "-h" in options or "--help" in options:
        print(f"`{prog} [ARGS]` runs `{command.runs} [ARGS]`:\n", flush=True)
    try:
        with one_line_usage_errors(prog):
            module = importlib.import_module(command.module)
            adapter = ADAPTERS.get(command.module)
            entry: Callable[[list[str]], Any] = functools.partial(adapter, module) if adapter else module.main
            code = entry([*command.prefix, *argv])
    except ImportError as exc:
        if exc.name is None or exc.name.partition(".")[0] in OWN_PACKAGES:
            raise  # a missing module of the project itself is a bug, not a missing dependency
        return fail(missing_dependency(exc), 2, prog)
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:
        return fail("interrupted", 130, prog)
    except Exception as exc:
        if not known(exc) or os.environ.get("TSFORGE_TRACEBACK"):
            raise
        return fail(describe(exc), 1, prog)
    return int(code or 0)


@contextlib.contextmanager
def one_line_usage_errors(prog: str) -> Iterator[None]:
    """While a command runs, an argparse error is one line naming `tsforge COMMAND` (exit 2 as before), not the
    module's usage block under its `python -m` name."""
    original = argparse.ArgumentParser.error

    def error(self: argparse.ArgumentParser, message: str) -> NoReturn:
        self.exit(2, f"{prog}: error: {message} (`{prog} --help` shows the options)\n")

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


# Failures that are about the world, not the code: reported in one line. Matched by qualified class name, so
# nothing is imported to check them.
KNOWN_ERRORS = frozenset({
    "builtins.OSError",  # missing files, refused ports; requests' errors are OSErrors too
    "subprocess.CalledProcessError", "subprocess.TimeoutExpired",
    "zipfile.BadZipFile",
    "yaml.error.YAMLError",
    "grpc.RpcError",
    "tsforge.serving.server.ServerError", "tsforge.clients.deploy.DeployError", "tsforge.serving.frontproc.FrontError",
    "export.spec.ExportError", "handlers.base.ArchiveIntegrityError", "handlers.runtimes.VariantUnavailable",
})


def known(exc: BaseException) -> bool:
    return any(f"{cls.__module__}.{cls.__qualname__}" in KNOWN_ERRORS for cls in type(exc).__mro__)


def describe(exc: BaseException) -> str:
    """One line for a known failure."""
    cls = type(exc)
    if cls.__module__ == "requests.exceptions" and cls.__name__ == "ConnectionError":
        url = getattr(getattr(exc, "request", None), "url", None) or "the server"
        return f"cannot reach {url}: is TorchServe running? (`{PROG} serve` or `make serve` starts it)"
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):  # a grpc.RpcError that is also a call
        message = f"gRPC {getattr(code(), 'name', code())}: {details()}"
    else:
        message = str(exc) or cls.__name__
        if not isinstance(exc, OSError) and cls.__module__.partition(".")[0] not in {*OWN_PACKAGES, "subprocess"}:
            message = f"{cls.__name__}: {message}"  # e.g. BadZipFile: File is not a zip file
    return " ".join(message.split())


# Import names that differ from the distribution to install (one table with tsforge/extras.py's).
DISTRIBUTIONS = extras.DISTRIBUTIONS


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(distribution: str) -> tuple[str | None, str | None]:
    """(requirement, extra) as the installed tsforge declares `distribution`; (None, None) when it does not."""
    from importlib import metadata

    try:
        requirements = metadata.requires("tsforge") or []
    except metadata.PackageNotFoundError:
        return None, None
    found: list[tuple[str, str | None]] = []
    for line in requirements:
        spec, _, marker = line.partition(";")
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.strip())
        if name and normalized(name.group()) == normalized(distribution):
            extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
            found.append((spec.strip(), extra.group(1) if extra else None))
    found.sort(key=lambda item: item[1] is not None)  # a core requirement first
    return found[0] if found else (None, None)


def missing_dependency(exc: ImportError) -> str:
    """One line for a package that is missing or does not import: the extra that installs it (tsforge/extras.py's
    table, then the installed metadata), else the requirement."""
    if isinstance(exc, extras.MissingExtra):
        return str(exc)  # already names its extra
    module = exc.name or "?"
    distribution = extras.distribution(module)
    requirement, extra = declared(distribution)
    extra = extras.extra_of(module) or extra
    install = extras.install_hint(extra) if extra else f"pip install '{requirement or distribution}'"
    if isinstance(exc, ModuleNotFoundError):
        return f"needs the Python package {distribution}, which is not installed: {install}"
    return f"the installed {distribution} does not fit ({' '.join(str(exc).split())}): {install}"
