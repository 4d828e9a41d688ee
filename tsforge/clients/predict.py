"""Send a model's example inputs (stored in its archive) or a file to a running TorchServe.

    python -m tsforge.clients.predict digits [--file photo.png] [--run-dir build/serve | --config
    config/config.properties]

While a TorchServe started from --run-dir (default build/serve) runs, the address and, under token
authorization, the inference key come from it; otherwise the address comes from --config.

Exits non-zero when an answer is not 200 or differs from the example's expected label.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import requests

from tsforge.project import ROOT
from tsforge.serving.server import TorchServe, read_properties


def archive_examples(mar: Path) -> list[dict[str, Any]]:
    with zipfile.ZipFile(mar) as archive:
        try:
            examples: list[dict[str, Any]] = json.loads(archive.read("examples.json"))
        except KeyError:
            raise SystemExit(f"{mar} holds no examples.json; pass --file") from None
    return examples


def matches(expect: dict[str, Any], answer: Any) -> bool:
    return all(isinstance(answer, dict) and answer.get(k) == v for k, v in expect.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.clients.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--file", type=Path, help="send this file's bytes instead of the examples")
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.properties")
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--version", help="address /predictions/MODEL/VERSION")
    parser.add_argument("--token", help="inference token when token authorization is on (default: from --run-dir)")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "build" / "serve",
                        help="run folder of the TorchServe to ask, used while it runs (addresses and keys)")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    server = TorchServe.attach(args.run_dir) if (args.run_dir / "config.properties").is_file() else None
    if server is not None and server.running():
        base = server.url("inference")
        headers = headers or server.auth("inference")
    else:
        base = read_properties(args.config)["inference_address"].rstrip("/")
    url = f"{base}/predictions/{args.model}" + (f"/{args.version}" if args.version else "")
    if args.file:
        cases: list[dict[str, Any]] = [{"body": args.file.read_bytes(), "expect": {}}]
    else:
        versioned = args.store / f"{args.model}-{args.version}.mar"
        cases = archive_examples(versioned if versioned.is_file() else args.store / f"{args.model}.mar")
    failures = 0
    for case in cases:
        if "body" in case:
            response = requests.post(url, data=case["body"], headers=headers, timeout=30)
        else:
            response = requests.post(url, json=case["input"], headers=headers, timeout=30)
        try:
            answer: Any = response.json()
        except ValueError:
            answer = response.text
        ok = response.status_code == 200 and matches(case.get("expect", {}), answer)
        failures += not ok
        version = response.headers.get("X-Model-Version", "")
        print(f"{response.status_code} {'ok ' if ok else 'BAD'} {version} {json.dumps(answer)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
