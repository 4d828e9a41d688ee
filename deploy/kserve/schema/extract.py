"""Trim KServe CRDs to the JSON Schemas vendored beside this file (see README.md there).

    python deploy/kserve/schema/extract.py KSERVE_CHECKOUT/config/crd/full/serving.kserve.io_inferenceservices.yaml ...

For each CRD: the openAPIV3Schema of its storage version, without `status` (never written by a manifest) and
without the `description` texts (most of the size), written as compact JSON named after the CRD's kind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def strip_descriptions(node: Any, in_properties: bool = False) -> Any:
    """Drop every schema's `description`, but not a property that happens to be named so."""
    if isinstance(node, dict):
        return {key: strip_descriptions(value, in_properties=key == "properties" and not in_properties)
                for key, value in node.items()
                if in_properties or key != "description" or not isinstance(value, str)}
    if isinstance(node, list):
        return [strip_descriptions(item) for item in node]
    return node


def extract(crd_path: Path) -> tuple[str, dict[str, Any]]:
    crd = yaml.safe_load(crd_path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    kind = crd["spec"]["names"]["kind"]
    schema["title"] = f"{crd['spec']['group']}/{version['name']} {kind}"
    return kind, schema


def main(argv: list[str]) -> int:
    for arg in argv:
        kind, schema = extract(Path(arg))
        target = HERE / f"{kind.lower()}.schema.json"
        target.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{target.name}: {target.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
