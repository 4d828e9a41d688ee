"""Roll a model version out, back, and away through TorchServe's management API (token-authorized).

    python -m tsforge.clients.deploy deploy   digits 2.0   # register digits-2.0.mar, smoke-test it, make it the default
    python -m tsforge.clients.deploy rollback digits       # the version that was the default before becomes it again
    python -m tsforge.clients.deploy undeploy digits 1.0   # unregister a version that is not the default
    python -m tsforge.clients.deploy status   digits       # versions, default, workers

Every command acts on the TorchServe started from --run-dir (default build/serve): its rendered
config gives the addresses and its key_file.json the management and inference keys.

A deploy is zero-downtime: the new version is registered beside the running one with its workers
started synchronously, answers the examples stored in its archive at /predictions/MODEL/VERSION (the
answer must match and carry the X-Model-Version header), and only then becomes the default, which
TorchServe switches atomically; the old version keeps its workers, so a rollback is instant. A version
that fails its smoke test is unregistered again and the default never changes.

Archive per version: model_store/MODEL-VERSION.mar (`make archive MODELS=digits VERSION=2.0`), or
model_store/MODEL.mar when that one holds the version. Deploy history (for rollback) is kept beside the
server's state in <run-dir>/deploy-history.json: per model, the versions made default, oldest first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import requests

from handlers.base import VERSION_HEADER
from handlers.provenance import VERSION_FILE
from tsforge.clients.predict import archive_examples, matches
from tsforge.packaging.verify import verify
from tsforge.project import ROOT
from tsforge.serving.server import TorchServe

HISTORY_FILE = "deploy-history.json"


class DeployError(RuntimeError):
    """A step of a rollout failed; the message says which and why."""


def archive_version(mar: Path) -> str:
    with zipfile.ZipFile(mar) as archive:
        return str(json.loads(archive.read(VERSION_FILE))["version"])


def find_archive(store: Path, model: str, version: str) -> Path:
    for candidate in (store / f"{model}-{version}.mar", store / f"{model}.mar"):
        if candidate.is_file() and archive_version(candidate) == version:
            return candidate
    raise DeployError(f"no archive of {model} {version} in {store}: build it with "
                      f"`make archive MODELS={model} VERSION={version}` (-> {model}-{version}.mar)")


class Management:
    """The REST management API of one TorchServe, with the management key."""

    def __init__(self, server: TorchServe, timeout: float = 300.0) -> None:
        self.server = server
        self.base = server.url("management")
        self.timeout = timeout

    def _call(self, method: str, path: str, **params: Any) -> Any:
        response = requests.request(method, self.base + path, params=params or None,
                                    headers=self.server.auth("management"), timeout=self.timeout)
        if response.status_code == 405 and path == "/models" and method == "POST":
            raise DeployError("the management API refuses registration (enable_model_api=false in this profile)")
        if response.status_code >= 400:
            raise DeployError(f"{method} {path} -> HTTP {response.status_code}: {_message(response)}")
        return response.json() if response.content else None

    def versions(self, model: str) -> dict[str, list[dict[str, Any]]]:
        """Every registered version of `model` with its workers; empty when the model is not registered."""
        try:
            described = self._call("GET", f"/models/{model}/all")
        except DeployError as exc:
            if "HTTP 404" in str(exc):
                return {}
            raise
        return {str(d["modelVersion"]): list(d.get("workers", [])) for d in described}

    def default(self, model: str) -> str | None:
        try:
            return str(self._call("GET", f"/models/{model}")[0]["modelVersion"])
        except DeployError as exc:
            if "HTTP 404" in str(exc):
                return None
            raise

    def register(self, mar: Path, model: str) -> None:
        # By file name only: TorchServe resolves it in its model store (no paths, no URLs).
        self._call("POST", "/models", url=mar.name, model_name=model, synchronous="true")

    def set_default(self, model: str, version: str) -> None:
        self._call("PUT", f"/models/{model}/{version}/set-default")

    def unregister(self, model: str, version: str) -> None:
        self._call("DELETE", f"/models/{model}/{version}")

    def wait_ready(self, model: str, version: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            workers = self.versions(model).get(version, [])
            if any(w.get("status") == "READY" for w in workers):
                return
            if time.monotonic() > deadline:
                raise DeployError(f"{model} {version}: no READY worker after {timeout:.0f}s ({workers})")
            time.sleep(0.25)


def _message(response: requests.Response) -> str:
    try:
        return str(response.json().get("message", response.text))
    except ValueError:
        return response.text[:300]


class History:
    """Per model, the versions made default by deploy, oldest first (a stack that rollback pops)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / HISTORY_FILE

    def load(self) -> dict[str, list[str]]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, model: str) -> list[str]:
        return list(self.load().get(model, []))

    def put(self, model: str, versions: list[str]) -> None:
        data = self.load()
        data[model] = versions
        scratch = self.path.with_suffix(".tmp")
        scratch.write_text(json.dumps(data, indent=2) + "\n")
        scratch.replace(self.path)


def smoke_test(server: TorchServe, model: str, version: str, mar: Path) -> list[str]:
    """Send the archive's examples to /predictions/MODEL/VERSION; returns what went wrong (empty: all good)."""
    url = f"{server.url('inference')}/predictions/{model}/{version}"
    failures = []
    for n, case in enumerate(archive_examples(mar)):
        response = requests.post(url, json=case["input"], headers=server.auth("inference"), timeout=60)
        answered = response.headers.get(VERSION_HEADER)
        try:
            answer = response.json()
        except ValueError:
            answer = response.text
        if response.status_code != 200 or not matches(case.get("expect", {}), answer):
            failures.append(f"example {n}: HTTP {response.status_code} {str(answer)[:200]}, "
                            f"expected {case.get('expect')}")
        elif answered != version:
            failures.append(f"example {n}: answered by version {answered!r}, not {version}")
    return failures


def deploy(server: TorchServe, model: str, version: str, store: Path, log: Any = print) -> None:
    mar = find_archive(store, model, version)
    report = verify(mar)
    if not report.ok:
        raise DeployError(f"{mar.name} fails verification: " + "; ".join(report.problems))
    api = Management(server)
    history = History(server.run_dir)
    previous = api.default(model)
    registered_here = version not in api.versions(model)
    if registered_here:
        log(f"registering {mar.name} as {model} {version} (synchronous)")
        try:
            api.register(mar, model)
        except DeployError as exc:
            # A worker that fails to start leaves the version registered without workers: take it away again.
            if version in api.versions(model) and api.default(model) != version:
                api.unregister(model, version)
            raise DeployError(f"{exc} (the workers' own words are in {server.run_dir / 'logs' / 'model_log.log'})"
                              ) from None
    api.wait_ready(model, version)
    failures = smoke_test(server, model, version, mar)
    if failures:
        if registered_here and api.default(model) != version:
            api.unregister(model, version)
        raise DeployError(f"{model} {version} failed its smoke test, default stays {previous}: " + "; ".join(failures))
    log(f"smoke test passed: {model} {version} answered its {len(archive_examples(mar))} examples")
    api.set_default(model, version)
    stack = [v for v in history.get(model) if v != version]
    if previous and previous != version and (not stack or stack[-1] != previous):
        stack = [v for v in stack if v != previous] + [previous]
    history.put(model, [*stack, version])
    log(f"{model}: default {previous} -> {version}")


def rollback(server: TorchServe, model: str, to: str | None = None, log: Any = print) -> str:
    api = Management(server)
    history = History(server.run_dir)
    current = api.default(model)
    registered = api.versions(model)
    stack = [v for v in history.get(model) if v in registered]
    if stack and stack[-1] == current:
        stack.pop()
    if to is None:
        others = [v for v in registered if v != current]
        if stack:
            to = stack[-1]
        elif len(others) == 1:
            to = others[0]
        else:
            raise DeployError(f"{model}: no earlier default recorded and {len(others)} other versions registered "
                              f"({', '.join(others) or 'none'}); pass --to VERSION")
    if to not in registered:
        raise DeployError(f"{model} {to} is not registered (registered: {', '.join(registered)})")
    api.wait_ready(model, to)
    api.set_default(model, to)
    if stack and stack[-1] == to:
        history.put(model, stack)
    else:
        history.put(model, [*[v for v in stack if v != to], to])
    log(f"{model}: default {current} -> {to} (rollback)")
    return to


def undeploy(server: TorchServe, model: str, version: str, log: Any = print) -> None:
    api = Management(server)
    if api.default(model) == version:
        raise DeployError(f"{model} {version} is the default; deploy or roll back to another version first")
    if version not in api.versions(model):
        raise DeployError(f"{model} {version} is not registered")
    api.unregister(model, version)
    history = History(server.run_dir)
    history.put(model, [v for v in history.get(model) if v != version])
    log(f"{model} {version} unregistered")


def status(server: TorchServe, model: str) -> str:
    api = Management(server)
    default = api.default(model)
    lines = [f"{model}: history {' -> '.join(History(server.run_dir).get(model)) or '(none)'}"]
    for version, workers in api.versions(model).items():
        states = ", ".join(str(w.get("status")) for w in workers) or "no workers"
        lines.append(f"  {'*' if version == default else ' '} {version}: {states}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.clients.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["deploy", "rollback", "undeploy", "status"])
    parser.add_argument("model")
    parser.add_argument("version", nargs="?", help="the version to deploy or undeploy")
    parser.add_argument("--to", help="rollback: the version to make the default (default: the previous one)")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "build" / "serve")
    parser.add_argument("--store", type=Path, help="model store holding the archives (default: the server's)")
    args = parser.parse_args(argv)
    try:
        server = TorchServe.attach(args.run_dir)
        if args.action in ("deploy", "undeploy") and not args.version:
            parser.error(f"{args.action} needs a VERSION")
        if args.action == "deploy":
            deploy(server, args.model, args.version, args.store or server.model_store)
        elif args.action == "rollback":
            rollback(server, args.model, args.to)
        elif args.action == "undeploy":
            undeploy(server, args.model, args.version)
        print(status(server, args.model))
    except (DeployError, requests.RequestException, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
