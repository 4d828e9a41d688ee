"""gRPC clients for TorchServe's inference and management services, from TorchServe's own protos.

    python -m tsforge.clients.grpc_client ping    [--run-dir build/serve]
    python -m tsforge.clients.grpc_client predict digits [--version 2.0] [--file photo.png]

The stubs are generated from the protos inside the installed frontend jar (tsforge.clients.grpc_stubs). Under
token authorization each call carries `authorization: Bearer <key>` metadata: the inference key on the
inference service, the management key on the management service. gRPC answers carry no headers here
(TorchServe 0.12 does not forward handler response headers to gRPC), so the answering version is not
reported per call; ask DescribeModel, or use HTTP where X-Model-Version is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc

from tsforge.clients.grpc_stubs import stubs
from tsforge.clients.predict import archive_examples, matches
from tsforge.project import ROOT
from tsforge.serving.server import KeyKind, TorchServe


class GrpcClient:
    """Both TorchServe gRPC services of one instance; use as a context manager or call close()."""

    def __init__(self, server: TorchServe, timeout: float = 60.0) -> None:
        self.server = server
        self.timeout = timeout
        props = server.props
        host = props.get("grpc_inference_address", "127.0.0.1")
        self._inference = grpc.insecure_channel(f"{host}:{props.get('grpc_inference_port', '7070')}")
        host = props.get("grpc_management_address", "127.0.0.1")
        self._management = grpc.insecure_channel(f"{host}:{props.get('grpc_management_port', '7071')}")
        self.s = stubs()
        self.inference = self.s.inference_grpc.InferenceAPIsServiceStub(self._inference)
        self.management = self.s.management_grpc.ManagementAPIsServiceStub(self._management)

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._inference.close()
        self._management.close()

    def _metadata(self, kind: KeyKind) -> tuple[tuple[str, str], ...]:
        key = self.server.key(kind)
        return (("authorization", f"Bearer {key}"),) if key else ()

    # ---- inference ---------------------------------------------------------------------------
    def ping(self) -> str:
        reply = self.inference.Ping(self.s.empty(), metadata=self._metadata("inference"), timeout=self.timeout)
        return str(reply.health)

    def predict(self, model: str, inputs: dict[str, bytes], version: str | None = None) -> bytes:
        request = self.s.inference.PredictionsRequest(model_name=model, model_version=version or "", input=inputs)
        reply = self.inference.Predictions(request, metadata=self._metadata("inference"), timeout=self.timeout)
        return bytes(reply.prediction)

    # ---- management --------------------------------------------------------------------------
    def _manage(self, method: str, request: Any) -> str:
        call = getattr(self.management, method)
        return str(call(request, metadata=self._metadata("management"), timeout=self.timeout).msg)

    def register(self, url: str, model: str, initial_workers: int = 1) -> str:
        m = self.s.management
        return self._manage("RegisterModel", m.RegisterModelRequest(
            url=url, model_name=model, initial_workers=initial_workers, synchronous=True))

    def set_default(self, model: str, version: str) -> str:
        return self._manage("SetDefault", self.s.management.SetDefaultRequest(model_name=model, model_version=version))

    def describe(self, model: str, version: str | None = None) -> list[dict[str, Any]]:
        request = self.s.management.DescribeModelRequest(model_name=model, model_version=version or "")
        described: list[dict[str, Any]] = json.loads(self._manage("DescribeModel", request))
        return described

    def unregister(self, model: str, version: str | None = None) -> str:
        request = self.s.management.UnregisterModelRequest(model_name=model, model_version=version or "")
        return self._manage("UnregisterModel", request)


def as_input_map(payload: Any) -> dict[str, bytes]:
    """An example's JSON input as a gRPC input map: strings as UTF-8, anything else as JSON."""
    if not isinstance(payload, dict):
        payload = {"data": payload}
    return {k: v.encode() if isinstance(v, str) else json.dumps(v).encode() for k, v in payload.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.clients.grpc_client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["ping", "predict"])
    parser.add_argument("model", nargs="?", default="digits")
    parser.add_argument("--version", help="ask this version instead of the default")
    parser.add_argument("--file", type=Path, help="send this file's bytes instead of the archive's examples")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "build" / "serve")
    args = parser.parse_args(argv)
    server = TorchServe.attach(args.run_dir)
    failures = 0
    with GrpcClient(server) as client:
        if args.action == "ping":
            print(client.ping().strip())
            return 0
        if args.file:
            cases: list[dict[str, Any]] = [{"inputs": {"data": args.file.read_bytes()}, "expect": {}}]
        else:
            versioned = server.model_store / f"{args.model}-{args.version}.mar"
            mar = versioned if versioned.is_file() else server.model_store / f"{args.model}.mar"
            cases = [{"inputs": as_input_map(c["input"]), "expect": c.get("expect", {})} for c in archive_examples(mar)]
        for case in cases:
            try:
                raw = client.predict(args.model, case["inputs"], args.version)
                answer: Any = json.loads(raw)
                ok = matches(case["expect"], answer)
            except grpc.RpcError as exc:
                answer, ok = f"{exc.code().name}: {exc.details()}", False
            failures += not ok
            print(f"{'ok ' if ok else 'BAD'} {json.dumps(answer)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
