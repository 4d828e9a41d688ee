"""Words in the configuration that must stay true:

- every module of the project that config/ and deploy/ name (a dotted `tsforge.`/`handlers.`/`export.`/`loadtest.`
  path, or a file path such as tsforge/serving/front.py) exists, so a package split leaves no stale name behind;
- the job queue's size is written once (tsforge.serving.jobqueue.JOB_QUEUE_SIZE) and every profile, the front and
  the KServe bundle read that one;
- the Flask baseline pins what its docstring says it serves: plain fp32 TorchScript.

Nothing here starts a server; module paths are resolved on disk and with `ast`, not imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tsforge.serving import jobqueue

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tsforge", "handlers", "export", "loadtest")
#: a dotted name in one of the project's packages (a log4j logger named after a Java class never starts so)
DOTTED = re.compile(rf"(?<![\w./-])(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+")
#: a path into one of them, as comments write it (tsforge/serving/front.py, handlers/, export/models/)
FILE_PATH = re.compile(rf"(?<![\w./-])(?:{'|'.join(PACKAGES)})/[\w/]*(?:\.py)?")
TEXT_SUFFIXES = {".properties", ".xml", ".yaml", ".yml", ".txt", ".md", ".py", ".json", ""}


def named_texts() -> list[Path]:
    files = [p for folder in ("config", "deploy") for p in sorted((ROOT / folder).rglob("*")) if p.is_file()]
    return [p for p in files if p.suffix in TEXT_SUFFIXES or p.name == "Dockerfile"]


def names_in(text: str) -> set[str]:
    return set(DOTTED.findall(text))


def top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def module_file(dotted: str) -> Path | None:
    """The file of a module of the project (a package's __init__.py), found on disk: nothing is imported."""
    base = ROOT / Path(*dotted.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def resolves(dotted: str) -> bool:
    """A module of the project, or one name defined at the top of one (tsforge.serving.jobqueue.JOB_QUEUE_SIZE)."""
    if module_file(dotted) is not None:
        return True
    module, _, attribute = dotted.rpartition(".")
    source = module_file(module)
    return source is not None and attribute in top_level_names(source)


def test_the_finder_catches_a_stale_name() -> None:
    assert names_in("Logging is log4j2.xml (tsforge.server passes --log-config); org.pytorch.serve") == {
        "tsforge.server"}
    assert not resolves("tsforge.server") and not resolves("tsforge.serving.jobqueue.NO_SUCH_NAME")
    assert resolves("tsforge.serving.server") and resolves("tsforge.serving.jobqueue.JOB_QUEUE_SIZE")
    assert FILE_PATH.findall("see tsforge/front.py and /opt/tsforge/config") == ["tsforge/front.py"]


def test_every_module_named_in_config_and_deploy_exists() -> None:
    stale = []
    for path in named_texts():
        text = path.read_text(errors="replace")
        where = path.relative_to(ROOT)
        stale += [f"{where}: {name}" for name in sorted(names_in(text)) if not resolves(name.rstrip("."))]
        stale += [f"{where}: {name}" for name in sorted(set(FILE_PATH.findall(text))) if not (ROOT / name).exists()]
    assert not stale, "names of modules that do not exist (moved?): " + "; ".join(stale)


def test_the_job_queue_size_is_written_once_and_read_everywhere(tmp_path: Path) -> None:
    from tsforge.kube import kserve
    from tsforge.serving.server import TorchServe, read_properties

    size = str(jobqueue.JOB_QUEUE_SIZE)
    for profile in sorted((ROOT / "config").glob("*.properties")):
        assert "job_queue_size" not in read_properties(profile), f"{profile.name} writes the size again"
        assert TorchServe(config=profile, run_dir=tmp_path / profile.stem).props["job_queue_size"] == size
    archive = kserve.Archive(tmp_path / "digits.mar", "digits", "1.0", {})
    assert f"\njob_queue_size={size}\n" in kserve.config_properties(archive)
    assert jobqueue.queue_size() == jobqueue.JOB_QUEUE_SIZE  # what the front says when told nothing


def test_the_flask_baseline_pins_plain_fp32_torchscript() -> None:
    pytest.importorskip("flask")
    from handlers.autoselect import Settings
    from loadtest.flask_baseline import NAIVE

    settings = Settings.from_config(dict(NAIVE), tolerance=0.02)
    assert (settings.backend, settings.precision, settings.fusion) == ("torchscript", "fp32", "false")
    assert NAIVE["channels_last"] is False
