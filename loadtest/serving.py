"""A TorchServe of its own for a load run: free loopback ports, a run folder under build/loadtest."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import requests

from tsforge.project import ROOT
from tsforge.serving.server import TorchServe, free_port_overrides, model_args

RUN_ROOT = ROOT / "build" / "loadtest" / "serve"
DEV_CONFIG = ROOT / "config" / "config.properties"


@contextlib.contextmanager
def torchserve(models: Sequence[str], *, store: Path = ROOT / "model_store", name: str = "default",
               config: Path = DEV_CONFIG, overrides: dict[str, str] | None = None,
               timeout: float = 300.0, env: dict[str, str] | None = None) -> Iterator[TorchServe]:
    """Start TorchServe with `models` (NAME or NAME=FILE.mar), wait until every worker is up, stop it after; `env`
    is added to its environment (its workers inherit it)."""
    run_dir = RUN_ROOT / name
    shutil.rmtree(run_dir, ignore_errors=True)
    names = [m.split("=", 1)[0] for m in models]
    archives = [m if "=" in m else model_args([m])[0] for m in models]
    server = TorchServe(config=config, run_dir=run_dir, model_store=store, models=archives,
                        overrides={**free_port_overrides(), **(overrides or {})}, env=env or {})
    server.start()
    try:
        server.wait_ready(names, timeout=timeout)
        yield server
    finally:
        server.stop()


def selection(server: TorchServe, model: str) -> dict[str, Any]:
    """How the server's workers run `model`: the handler's description (backend, precision, fusion, the
    timings `auto` measured), from the management API; empty for handlers that describe nothing."""
    response = requests.get(f"{server.url('management')}/models/{model}", params={"customized": "true"},
                            headers=server.auth("management"), timeout=30)
    response.raise_for_status()
    metadata = response.json()[0].get("customizedMetadata") or {}
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    found: dict[str, Any] = metadata.get("selection") or {}
    return found
