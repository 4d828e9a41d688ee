"""python -m export NAME [NAME ...] --out-dir build: export declared models to TorchScript."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from export.exporter import export_model
from export.registry import MODELS, get
from export.spec import ExportError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("models", nargs="+", help=f"declared models: {', '.join(sorted(MODELS))}")
    parser.add_argument("--out-dir", type=Path, default=Path("build"), help="writes OUT_DIR/NAME/NAME.pt")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in args.models:
        spec = get(name)
        try:
            report = export_model(spec, args.out_dir / name)
        except ExportError as exc:
            print(f"export failed: {exc}", file=sys.stderr)
            return 1
        metrics = ", ".join(f"{k}={v}" for k, v in report.metrics.items())
        print(f"exported {name} r{spec.revision}: parity max|diff|={report.parity_max_abs_diff:.2e} {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
