"""`python -m tsforge.packaging.wanted --build build --variants REQUEST NAME...`: the Makefile's record of the
variants each model's export holds (build/NAME/variants), rewritten only when the request asks for more.

What a request means and how the record grows live in export/wanted.py, beside the export that reads them.
Stdlib only: the Makefile runs it with the system Python, before the virtual environment exists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export import wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.packaging.wanted", description=wanted.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*")
    parser.add_argument("--build", type=Path, required=True, help="the build folder (build/NAME/variants)")
    parser.add_argument("--variants", default=wanted.DEFAULT, help="the request (make's VARIANTS)")
    args = parser.parse_args(argv)
    try:
        for name in args.models:
            wanted.record(args.build / name, args.variants)
    except wanted.RequestError as exc:  # the export itself says it again, and fails
        print(f"VARIANTS: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
