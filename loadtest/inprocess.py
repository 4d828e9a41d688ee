"""An archive's handler run in this process, with TorchServe's own `Context`: no server, no network.

Used for reference answers (what every served answer must match), for the in-process ceiling of
`make bench` (a batched loop over the same payloads), and by the Flask baseline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from ts.context import Context, RequestProcessor

from loadtest.payloads import JSON_TYPE, Case, expectation
from tsforge.project import ROOT

UNPACK_DIR = ROOT / "build" / "loadtest" / "unpacked"


def unpack(mar: Path, into: Path = UNPACK_DIR) -> Path:
    """Extract an archive once per content (keyed by its digest); returns the model folder."""
    digest = hashlib.sha256(mar.read_bytes()).hexdigest()[:16]
    target = into / f"{mar.stem}-{digest}"
    if not (target / "MAR-INF" / "MANIFEST.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(mar) as archive:
            archive.extractall(target)
    return target


def request_row(case: Case) -> dict[str, Any]:
    """The row TorchServe's Python worker hands a handler for this body (JSON parsed, text decoded)."""
    if case.content_type == JSON_TYPE:
        return {"body": json.loads(case.body)}
    if case.content_type.startswith("text/"):
        return {"body": case.body.decode()}
    return {"body": case.body}


@dataclass
class LocalHandler:
    """The entry handler of an unpacked archive, initialised as a TorchServe worker would."""

    model_dir: Path
    handler: Any
    manifest: dict[str, Any]
    model_config: dict[str, Any]

    @classmethod
    def load(cls, mar: Path, handler_overrides: dict[str, Any] | None = None,
             threads: int | None = None) -> LocalHandler:
        model_dir = unpack(mar)
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        config_file = model_dir / "model-config.yaml"
        model_config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
        model_config = dict(model_config or {})
        model_config["handler"] = {**(model_config.get("handler") or {}), **(handler_overrides or {})}
        if threads is not None:
            model_config["handler"]["threads"] = threads
        entry = model_dir / manifest["model"]["handler"].split(":")[0]
        spec = importlib.util.spec_from_file_location(f"_loadtest_{mar.stem}_{entry.stem}", entry)
        if spec is None or spec.loader is None:
            raise RuntimeError(f"cannot import the handler {entry}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        handler_class = _handler_class(module)
        self = cls(model_dir, handler_class(), manifest, model_config)
        self.handler.initialize(self.context(1))
        return self

    def context(self, batch: int) -> Context:
        name = self.manifest["model"]["modelName"]
        context = Context(name, str(self.model_dir), self.manifest, batch, None, "0.12.0",
                          model_yaml_config=self.model_config)
        context.request_processor = [RequestProcessor({}) for _ in range(batch)]
        return context

    def handle(self, cases: list[Case]) -> list[tuple[int, bytes]]:
        """(status, body) per case, as the server would answer them."""
        context = self.context(len(cases))
        bodies = self.handler.handle([request_row(c) for c in cases], context)
        return [(int(context.get_response_status(i)[0]), _as_bytes(b)) for i, b in enumerate(bodies)]


def _handler_class(module: Any) -> type:
    from ts.torch_handler.base_handler import BaseHandler

    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, BaseHandler) and v.__module__ == module.__name__]
    if len(classes) != 1:
        raise RuntimeError(f"{module.__file__} should define exactly one handler class, found {len(classes)}")
    return classes[0]


def _as_bytes(body: Any) -> bytes:
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    return body.encode() if isinstance(body, str) else json.dumps(body).encode()


#: handler settings that make the archive's handler run the plain fp32 TorchScript export, as the stock handler
#: and the Flask baseline do: their answers are checked against this reference
PLAIN_FP32 = {"backend": "torchscript", "precision": "fp32", "onednn_fusion": False}


def reference_answers(mar: Path, cases: list[Case], handler_overrides: dict[str, Any] | None = None) -> list[Case]:
    """The cases with `expect` set from the archive's own handler (run as the server runs it, or with
    `handler_overrides`); ambiguous or failing ones dropped."""
    local = LocalHandler.load(mar, handler_overrides)
    kept = []
    for case in cases:
        status, body = local.handle([case])[0]
        if status != 200:
            continue
        expect = expectation(json.loads(body))
        if expect is not None:
            kept.append(Case(case.name, case.body, case.content_type, expect))
    if not kept:
        raise RuntimeError(f"no payload of {mar.name} got a clear reference answer in-process")
    return kept


@dataclass(frozen=True)
class Ceiling:
    batch_size: int
    handler_items_per_s: float  # decode + infer + encode, batched, one thread of control
    model_items_per_s: float  # the forward pass alone on a pre-decoded batch
    threads: int


def ceiling(mar: Path, cases: list[Case], batch_size: int, duration_s: float,
            threads: int | None = None) -> Ceiling:
    """A batched loop over the payloads in-process: the throughput no server can beat on this machine."""
    local = LocalHandler.load(mar, threads=threads or torch.get_num_threads())
    batches = [[cases[(start + k) % len(cases)] for k in range(batch_size)]
               for start in range(0, len(cases), batch_size)]
    local.handle(batches[0])  # warm-up (lazy init, oneDNN primitive cache)
    handled, started = 0, time.perf_counter()
    while time.perf_counter() - started < duration_s:
        local.handle(batches[handled // batch_size % len(batches)])
        handled += batch_size
    handler_rate = handled / (time.perf_counter() - started)
    model_rate = _model_rate(local, batches[0], duration_s)
    return Ceiling(batch_size, round(handler_rate, 2), round(model_rate, 2), torch.get_num_threads())


def _model_rate(local: LocalHandler, batch: list[Case], duration_s: float) -> float:
    handler = local.handler
    if not all(hasattr(handler, name) for name in ("decode", "collate", "infer")):
        return float("nan")
    from handlers.payload import extract, parse_json_bytes

    items = []
    for case in batch:
        payload = extract(request_row(case))
        items.append(handler.decode(parse_json_bytes(payload) if isinstance(payload, bytes) else payload))
    with torch.inference_mode():
        collated = handler.collate(items)
        handler.infer(collated)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < duration_s:
            handler.infer(collated)
            done += len(items)
    return done / (time.perf_counter() - started)


def prepared_cases(model: str, mar: Path, count: int = 32, seed: int = 0,
                   handler_overrides: dict[str, Any] | None = None) -> list[Case]:
    """The model's payloads with reference answers, cached per archive content in build/loadtest."""
    # Keyed by the archive, the payload code and the choice cache `auto` reads (handlers/autoselect.py): either
    # changing makes new references, so they come from the variant the servers sharing that cache serve.
    from handlers.autoselect import cache_dir
    from loadtest import payloads
    from loadtest.payloads import load, raw_cases, save

    digest = hashlib.sha256(mar.read_bytes() + Path(payloads.__file__).read_bytes()
                            + json.dumps(handler_overrides, sort_keys=True).encode()
                            + str(cache_dir().resolve()).encode()).hexdigest()[:16]
    cache = ROOT / "build" / "loadtest" / "payloads" / f"{model}-{digest}-{count}-{seed}.json"
    if cache.is_file():
        return load(cache)
    cases = reference_answers(mar, raw_cases(model, mar, count, seed), handler_overrides)
    save(cases, cache)
    return cases
