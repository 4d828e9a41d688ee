"""Facts about the project itself: its version and the git state of the served code."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
SERVED_PATHS = ("handlers", "export", "config", "pyproject.toml")


def project_version(root: Path = ROOT) -> str:
    with (root / "pyproject.toml").open("rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


def archive_version(revision: int, root: Path = ROOT) -> str:
    """The one place an archive version comes from: project version plus the model's revision."""
    return f"{project_version(root)}-r{revision}"


@dataclass(frozen=True)
class GitState:
    commit: str
    dirty: bool


def git_state(root: Path = ROOT) -> GitState:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return GitState(commit="unknown", dirty=True)
    dirty = bool(git("status", "--porcelain", "--", *SERVED_PATHS))
    return GitState(commit=commit, dirty=dirty)
