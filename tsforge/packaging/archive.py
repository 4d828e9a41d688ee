"""Package an exported model into `model_store/<name>.mar` with its handler and a version file.

    python -m tsforge.packaging.archive digits [--version 2.0] [--config config/models/digits.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from export.registry import MODELS, get
from export.spec import ModelSpec
from handlers.provenance import VERSION_FILE, hash_files
from tsforge.project import ROOT, archive_version, git_state, project_version
from tsforge.serving import gpus

HANDLER_PACKAGE = "handlers"
OPTIONAL_EXPORT_FILES = ("index_to_name.json", "export.json", "examples.json")


@dataclass(frozen=True)
class ArchivePlan:
    spec: ModelSpec
    version: str
    export_dir: Path
    config_file: Path
    store: Path
    archive_name: str
    model_name: str = ""  # the name in the manifest; default: the declared model's name
    handler: str = ""  # the entry handler file; default: the declared model's handler
    device: str = "auto"  # gpu: the config's `gpu:` section applies; auto: gpu when CUDA is present here

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_name", self.model_name or self.spec.name)
        object.__setattr__(self, "handler", self.handler or self.spec.handler)

    @property
    def stage(self) -> Path:
        suffix = "" if self.model_name == self.spec.name else f"-{self.model_name}"
        return self.export_dir / f"stage{suffix}"

    @property
    def mar(self) -> Path:
        return self.store / f"{self.archive_name}.mar"


def plan(name: str, *, version: str | None = None, build_dir: Path = ROOT / "build",
         store: Path = ROOT / "model_store", config_file: Path | None = None,
         archive_name: str | None = None, model_name: str | None = None,
         handler: str | None = None, device: str = "auto") -> ArchivePlan:
    spec = get(name)
    return ArchivePlan(
        spec=spec,
        version=version or archive_version(spec.revision),
        export_dir=build_dir / name,
        config_file=config_file or ROOT / "config" / "models" / f"{name}.yaml",
        store=store,
        archive_name=archive_name or model_name or name,
        model_name=model_name or "",
        handler=handler or "",
        device=device,
    )


def model_config(config_file: Path, device: str = "auto") -> tuple[str, dict[str, Any]]:
    """The model-config.yaml to package and the settings its `gpu:` section changed.

    On a GPU host (`device` gpu, or auto with CUDA present) the section's TorchServe keys (minWorkers,
    maxWorkers, batchSize, maxBatchDelay...) replace the top-level ones, since TorchServe reads them from
    the archive; its `handler:` keys stay in the section and apply in each worker whose device is CUDA.
    `workers_per_gpu: W` packages W workers (one GPU's worth); the server start scales them to W x the GPUs it
    sees (tsforge/serving/gpus.py). The top-level values replaced are kept under `cpu:`, so the settings of
    either device can be read back from the archive (gpus.device_settings: the KServe bundle's CPU runtime)."""
    text = config_file.read_text()
    if device not in ("auto", "cpu", "gpu"):
        raise SystemExit(f"--device must be auto, cpu or gpu; got {device!r}")
    gpu = device == "gpu" or (device == "auto" and torch.cuda.is_available())
    config = yaml.safe_load(text) or {}
    section = config.get("gpu") if isinstance(config, dict) else None
    if not gpu or not isinstance(section, dict):
        return text, {}
    try:
        changed = gpus.gpu_changes(config)
    except ValueError as exc:
        raise SystemExit(f"{config_file}: {exc}") from None
    replaced = {k: config[k] for k in changed if k in config}
    return yaml.safe_dump({**config, **changed, "cpu": replaced}, sort_keys=False), changed


def stage(p: ArchivePlan) -> list[str]:
    """Copy everything that goes into the archive into one folder; returns the extra-file names."""
    weights = p.export_dir / f"{p.spec.name}.pt"
    if not weights.is_file():
        raise SystemExit(f"{weights} is missing: run `make export MODEL={p.spec.name}` first")
    if not p.config_file.is_file():
        raise SystemExit(f"model config {p.config_file} is missing")
    shutil.rmtree(p.stage, ignore_errors=True)
    package = p.stage / HANDLER_PACKAGE
    package.mkdir(parents=True)
    for module in sorted((ROOT / HANDLER_PACKAGE).glob("*.py")):
        shutil.copy2(module, package / module.name)
    handler = ROOT / p.handler
    shutil.copy2(handler, p.stage / handler.name)
    shutil.copy2(weights, p.stage / weights.name)
    config_text, gpu_settings = model_config(p.config_file, p.device)
    (p.stage / "model-config.yaml").write_text(config_text)
    if gpu_settings:
        print(f"{p.model_name}: GPU host, model-config.yaml gpu section applied: "
              + ", ".join(f"{k}={v}" for k, v in gpu_settings.items()))
    # Files the model's factory shipped (tokenizers, settings) are listed in export.json.
    listed = json.loads((p.export_dir / "export.json").read_text()).get("extra_files", [])
    extras = list(dict.fromkeys([*(n for n in OPTIONAL_EXPORT_FILES if (p.export_dir / n).is_file()), *listed]))
    for name in extras:
        shutil.copy2(p.export_dir / name, p.stage / name)
    return extras


def write_version_file(p: ArchivePlan, extras: list[str]) -> dict[str, object]:
    hashed = [
        f"{p.spec.name}.pt",
        Path(p.handler).name,
        "model-config.yaml",
        *extras,
        *(f"{HANDLER_PACKAGE}/{m.name}" for m in sorted((p.stage / HANDLER_PACKAGE).glob("*.py"))),
    ]
    git = git_state()
    record: dict[str, object] = {
        "model": p.spec.name,
        "version": p.version,
        "project_version": project_version(),
        "model_revision": p.spec.revision,
        "git_commit": git.commit,
        "git_dirty": git.dirty,
        "torch": torch.__version__,
        "files": hash_files(p.stage, hashed),
    }
    (p.stage / VERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def build(p: ArchivePlan) -> Path:
    extras = stage(p)
    write_version_file(p, extras)
    p.store.mkdir(parents=True, exist_ok=True)
    script = Path(sys.executable).with_name("torch-model-archiver")
    archiver = [str(script)] if script.is_file() else [sys.executable, "-m", "model_archiver.model_packaging"]
    # The manifest names the model (digits); the file name may carry a version (digits-2.0.mar). The archiver
    # names its output after the model, so it writes into a scratch folder and the result is moved.
    scratch = p.stage.with_name(p.stage.name.replace("stage", "mar", 1))
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    command = [
        *archiver,
        "--model-name", p.model_name,
        "--version", p.version,
        "--serialized-file", str(p.stage / f"{p.spec.name}.pt"),
        "--handler", str(p.stage / Path(p.handler).name),
        # A folder given as extra file is copied with its layout: the stage is the archive's root.
        "--extra-files", str(p.stage),
        "--config-file", str(p.stage / "model-config.yaml"),
        "--export-path", str(scratch),
        "--force",
    ]
    # torch-model-archiver gathers the files in <temp dir>/<model name>: give it a private temp dir, or two
    # checkouts archiving the same model at once mix each other's files.
    with tempfile.TemporaryDirectory(prefix="tsforge-archive-") as private:
        subprocess.run(command, check=True, env={**os.environ, "TMPDIR": private})
    shutil.move(scratch / f"{p.model_name}.mar", p.mar)
    return p.mar


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.packaging.archive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help=f"declared models: {', '.join(sorted(MODELS))}")
    parser.add_argument("--version", help="override the archive version (default: <project>-r<revision>)")
    parser.add_argument("--config", type=Path, help="model-config.yaml to package (default: config/models/NAME.yaml)")
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build")
    parser.add_argument("--archive-name", help="file name in the store, without .mar (default: NAME); the model "
                        "inside keeps its name, so NAME-2.0 registers as a second version of NAME")
    parser.add_argument("--model-name", help="serve the export as another model (default: NAME), e.g. with another "
                        "--handler and --config; the archive file is named after it unless --archive-name is given")
    parser.add_argument("--handler", help="entry handler file (default: the one NAME declares)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                        help="gpu: package the config's gpu: settings; auto (default): when CUDA is present here")
    args = parser.parse_args(argv)
    for name in args.models:
        p = plan(name, version=args.version, build_dir=args.build_dir, store=args.store,
                 config_file=args.config, archive_name=args.archive_name, model_name=args.model_name,
                 handler=args.handler, device=args.device)
        mar = build(p)
        print(f"archived {name} {p.version} -> {mar.relative_to(ROOT) if mar.is_relative_to(ROOT) else mar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
