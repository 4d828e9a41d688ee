"""The bench matrix: the same archive served with each backend x precision x fusion pinned, side by side with
`auto`, so a reader sees what `auto` chose among and why.

    python -m loadtest.bench --model resnet18 --levels 16 --matrix

Each cell is the archive rebuilt with its model-config's `handler:` section pinned to one variant (the
archive tool rewrites the version file, so workers accept it), served by a real TorchServe and measured
like the other rows. bf16 and fp16 cells are measured even where the CPU would emulate them: `auto`
skips those, and the matrix shows what that saves.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml

from handlers import autoselect, runtimes
from handlers.capabilities import CPU_FLAGS, Capabilities, detect
from tsforge.packaging import archive


def cells(mar: Path, export_dir: Path) -> list[runtimes.Variant]:
    """Every variant the archive can be served as on a CPU, whether or not this CPU runs it natively."""
    with zipfile.ZipFile(mar) as opened:
        torchscript = json.loads(opened.read("MAR-INF/MANIFEST.json"))["model"]["serializedFile"]
    everything = Capabilities("cpu", "any", frozenset(CPU_FLAGS))
    artefacts = runtimes.Artefacts.read(export_dir, torchscript)
    return autoselect.candidates(autoselect.Settings(), everything, artefacts)


def pinned_archive(model: str, variant: runtimes.Variant | None, mar: Path, build: Path, store: Path,
                   model_name: str | None = None, **settings: Any) -> Path:
    """MODEL.mar rebuilt from the exports in `build` into `store` (as MODEL_NAME.mar, default MODEL) with its
    handler pinned to `variant` (None: as configured) and the other `handler:` `settings` given."""
    with zipfile.ZipFile(mar) as opened:
        config = yaml.safe_load(opened.read("model-config.yaml")) or {}
    handler = dict(config.get("handler") or {})
    if variant is not None:
        handler.update(backend=variant.backend, precision=variant.precision, onednn_fusion=variant.fusion)
    handler.update(settings)
    config["handler"] = handler
    store.mkdir(parents=True, exist_ok=True)
    config_file = store / f"{model_name or model}-{variant.name if variant else 'auto'}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    name = model_name or model
    archive.main([model, "--config", str(config_file), "--store", str(store), "--build-dir", str(build),
                  "--model-name", name])
    return store / f"{name}.mar"


def native(variant: runtimes.Variant) -> bool:
    caps = detect(torch.device("cpu"))
    return variant.precision in caps.precisions() or (variant.precision == "int8" and caps.fast_int8)


def markdown(result: dict[str, Any]) -> list[str]:
    """The matrix table: one row per variant, the row `auto` chose marked, with the CPU flags that decided it."""
    matrix = result.get("matrix")
    if not matrix:
        return []
    chosen = (result.get("selection") or {}).get("variant")
    trials = {t["variant"]: t for t in (result.get("selection") or {}).get("trials", [])}
    flags = (result.get("selection") or {}).get("capabilities", {}).get("flags", [])
    level = matrix["level"]
    stock = next((r["qps"] for r in result["rows"] if r["target"] == "stock" and r["level"] == level), None)
    lines = ["", f"#### Backend x precision x fusion at concurrency {level}", "",
             f"CPU flags torch reports: {', '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)}. "
             f"`auto` chose **{chosen or '-'}** at worker start (the timings below are its own, on a batch of the "
             "archive's example inputs; discrepancy is against fp32).", "",
             "| variant | native here | served req/s | P99 ms | vs stock | auto's timing ms/batch | discrepancy |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in matrix["rows"]:
        trial = trials.get(row["variant"], {})
        mark = " (auto's choice)" if row["variant"] == chosen else ""
        ratio = f"{row['qps'] / stock:.2f}x" if stock and row.get("qps") else "-"
        served = row.get("qps", "does not run: " + str(row.get("error", "?")).splitlines()[-1][:80])
        timing = trial.get("ms_per_batch") or ("failed" if trial.get("error") else "not a candidate here")
        lines.append(f"| {row['variant']}{mark} | {'yes' if row['native'] else 'no (emulated)'} | "
                     f"{served} | {row.get('p99_ms', '-')} | {ratio} | {timing} | {trial.get('discrepancy', '-')} |")
    return lines
