"""Python gRPC stubs for TorchServe, generated from the protos inside the installed frontend jar.

Nothing is hand-copied: `generate()` extracts `inference.proto`, `management.proto` and
`open_inference_grpc.proto` from `ts/frontend/model-server.jar` and runs grpcio-tools on them. The
stubs land in `build/grpc` (git-ignored) and are rebuilt when the jar or the protobuf runtime changes.

    from tsforge.clients.grpc_stubs import stubs
    s = stubs()
    channel = grpc.insecure_channel("127.0.0.1:7070")
    s.inference_grpc.InferenceAPIsServiceStub(channel).Ping(s.empty())

`python -m tsforge.clients.grpc_stubs` generates them ahead of time (the Makefile's `grpc` target).
"""

from __future__ import annotations

import importlib
import sys
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import ts

from handlers.provenance import sha256
from tsforge.project import ROOT

PROTOS = ("inference.proto", "management.proto", "open_inference_grpc.proto")
# Needed to compile the protos; its Python module comes from googleapis-common-protos.
IMPORTED = ("google/rpc/status.proto",)
OUT = ROOT / "build" / "grpc"


def frontend_jar() -> Path:
    return Path(ts.__file__).parent / "frontend" / "model-server.jar"


def generate(out: Path = OUT) -> Path:
    """Extract the protos and compile them into `out`; a no-op when they are current."""
    import google.protobuf
    from grpc_tools import protoc

    jar = frontend_jar()
    stamp = out / "jar.sha256"
    # generated code is tied to the protobuf runtime's major version too (protobuf refuses newer gencode)
    digest = f"{sha256(jar)} protobuf-{google.protobuf.__version__}"
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return out
    proto_dir = out / "proto"
    proto_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(jar) as archive:
        for name in PROTOS:
            (proto_dir / name).write_bytes(archive.read(f"proto/{name}"))
        for name in IMPORTED:
            (proto_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (proto_dir / name).write_bytes(archive.read(name))
    include = Path(protoc.__file__).parent / "_proto"
    for name in PROTOS:
        code = protoc.main(["grpc_tools.protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}",
                            f"--grpc_python_out={out}", str(proto_dir / name)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {name} (exit {code})")
    stamp.write_text(digest + "\n")
    return out


@dataclass(frozen=True)
class Stubs:
    inference: ModuleType
    inference_grpc: ModuleType
    management: ModuleType
    management_grpc: ModuleType
    open_inference: ModuleType
    open_inference_grpc: ModuleType

    @staticmethod
    def empty() -> Any:
        from google.protobuf import empty_pb2

        return empty_pb2.Empty()


@cache
def stubs(out: Path = OUT) -> Stubs:
    generate(out)
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    load = importlib.import_module
    return Stubs(
        inference=load("inference_pb2"),
        inference_grpc=load("inference_pb2_grpc"),
        management=load("management_pb2"),
        management_grpc=load("management_pb2_grpc"),
        open_inference=load("open_inference_grpc_pb2"),
        open_inference_grpc=load("open_inference_grpc_pb2_grpc"),
    )


if __name__ == "__main__":
    print(f"gRPC stubs in {generate()}")
