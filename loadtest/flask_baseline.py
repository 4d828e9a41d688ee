"""The usual baseline: a plain Flask server that runs one forward pass per request, in its request thread.

It serves an archive's model with the archive's own decode and encode code (so answers and input
handling match TorchServe's), but the way such servers are commonly written: Flask's threaded
development server, no batching, no worker processes, plain fp32 TorchScript by default (`--as-archived`
keeps the archive's precision, memory format and oneDNN fusion instead).

    python -m loadtest.flask_baseline --mar model_store/resnet18.mar --port 5000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from loadtest.inprocess import LocalHandler, request_row
from loadtest.payloads import Case
from tsforge import extras

#: the subject of a missing `loadtest` extra's message (tsforge/extras.py)
PURPOSE = "the Flask baseline (bench target flask)"

try:
    from flask import Flask, Response, request
except ImportError as exc:
    raise extras.missing(exc, "loadtest", PURPOSE, "flask") from None

#: plain fp32 TorchScript, pinned: no variant is measured or picked at load (handlers/autoselect.py), no oneDNN
#: fusion, the default memory format
NAIVE = {"backend": "torchscript", "precision": "fp32", "onednn_fusion": False, "channels_last": False}


def create_app(local: LocalHandler) -> Flask:
    from handlers.errors import RequestError
    from handlers.payload import extract, parse_json_bytes

    handler = local.handler
    name = local.manifest["model"]["modelName"]
    app = Flask(__name__)

    @app.get("/ping")
    def ping() -> Response:
        return Response(json.dumps({"status": "Healthy"}), mimetype="application/json")

    @app.post(f"/predictions/{name}")
    def predict() -> Response:
        case = Case("request", request.get_data(), request.content_type or "application/octet-stream")
        try:
            payload: Any = extract(request_row(case))
            if isinstance(payload, bytes):
                payload = parse_json_bytes(payload)
            item = handler.decode(payload)
        except RequestError as exc:
            return Response(json.dumps(exc.to_json()), status=exc.status, mimetype="application/json")
        with torch.inference_mode():
            output = handler.infer(handler.collate([item]))
        row = handler.unbatch(output, 1)[0]
        return Response(json.dumps(handler.encode(row)), mimetype="application/json")

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.flask_baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mar", type=Path, required=True)
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--as-archived", action="store_true", help="keep the archive's precision/channels_last")
    args = parser.parse_args(argv)
    local = LocalHandler.load(args.mar, handler_overrides=None if args.as_archived else NAIVE,
                              threads=torch.get_num_threads())
    create_app(local).run(host="127.0.0.1", port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
