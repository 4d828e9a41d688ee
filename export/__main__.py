"""python -m export NAME [NAME ...] --out-dir build [--variants quick]: export declared models to TorchScript,
with the variants asked for (export/wanted.py: quick, the default, is every declared one but AOTInductor)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from export import wanted
from export.exporter import export_model
from export.registry import MODELS, get
from export.spec import ExportError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("models", nargs="+", help=f"declared models: {', '.join(sorted(MODELS))}")
    parser.add_argument("--out-dir", type=Path, default=Path("build"), help="writes OUT_DIR/NAME/NAME.pt")
    parser.add_argument("--variants", default=wanted.DEFAULT,
                        help="exports beside fp32 TorchScript: quick (default: every declared one but aotinductor), "
                        f"all, none, or names among {','.join(wanted.VARIANT_NAMES)}; the declaration bounds them")
    args = parser.parse_args(argv)
    try:
        wanted.expand(args.variants)
    except wanted.RequestError as exc:
        parser.error(f"--variants: {exc}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in args.models:
        spec = get(name)
        variants, undeclared = wanted.resolve(args.variants, spec.variants)
        if undeclared:
            print(f"{name} declares no {', '.join(undeclared)} variant: skipped")
        try:
            report = export_model(spec, args.out_dir / name, variants=variants)
        except ExportError as exc:
            print(f"export failed: {exc}", file=sys.stderr)
            return 1
        metrics = ", ".join(f"{k}={v}" for k, v in report.metrics.items())
        print(f"exported {name} r{spec.revision} with {wanted.as_request(variants)}: "
              f"parity max|diff|={report.parity_max_abs_diff:.2e} {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
