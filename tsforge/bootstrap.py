"""`pip install ARGS` for the Makefile's install targets, done by uv where it can be (standard library only: it runs
in the new venv before tsforge is installed).

    .venv/bin/python tsforge/bootstrap.py pip install -q torch==2.14.1 torchvision==0.29.1

uv takes the same files from the same places as pip: pip's own configuration is read at run time (`pip config
list`: find-links, index URLs, constraints, the certificate bundle) and handed to uv, so nothing about this machine
is written in the repository. It unpacks and byte-compiles on every core where pip does one file after another.
Byte-compiling is kept on: where PYTHONDONTWRITEBYTECODE is set, an uncompiled torch would be compiled again by
every process that imports it (each TorchServe worker). uv is the one on PATH, else one pip puts in `.venv/.uv`.
Plain pip runs instead when uv cannot be had, when pip's configuration has a setting uv has no twin for, or when
uv fails.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: the uv release these flags were checked with (a later one may rename them; then pip runs)
UV = "uv==0.13.9"
#: pip settings with a uv flag of the same meaning
FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}
#: pip settings that do not change what is installed
HARMLESS = {"disable-pip-version-check", "timeout", "default-timeout", "no-input", "progress-bar", "cache-dir",
            "no-cache-dir", "root-user-action", "no-warn-script-location", "quiet", "verbose", "retries"}
#: pip's precedence: environment variables over the `install` section over `global`
RANK = {"global": 0, "install": 1, ":env:": 2}


def pip(args: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", *args])


def find_uv(venv: Path) -> str | None:
    """uv on PATH, or the one installed into `venv/.uv` (installed there now if missing); None if it cannot be."""
    local = venv / ".uv" / "bin" / "uv"
    found = shutil.which("uv") or (str(local) if os.access(local, os.X_OK) else None)
    if found:
        return found
    installed = subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--target", str(venv / ".uv"), UV],
                                stderr=subprocess.DEVNULL)
    return str(local) if installed == 0 and os.access(local, os.X_OK) else None


def pip_settings() -> dict[str, str]:
    """pip's effective configuration (`pip config list`), each name with the value that wins."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    ranked: dict[str, tuple[int, str]] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if section in RANK and RANK[section] >= ranked.get(name, (-1, ""))[0]:
            ranked[name] = (RANK[section], str(ast.literal_eval(value)))
    return {name: value for name, (_, value) in ranked.items()}


def uv_options(settings: dict[str, str], env: dict[str, str]) -> list[str] | None:
    """uv's flags for pip's settings (the certificate goes into `env`); None when one has no uv twin."""
    options: list[str] = []
    for name, value in settings.items():
        if name in FLAGS:
            options += [part for item in value.split() for part in (FLAGS[name], item)]
        elif name == "no-index" and value.lower() in ("1", "true", "yes", "on"):
            options.append("--no-index")
        elif name == "cert":
            env["SSL_CERT_FILE"] = value
        elif name not in HARMLESS:
            return None
    return options


def main(argv: list[str]) -> int:
    if argv[:2] != ["pip", "install"]:
        print("usage: bootstrap.py pip install [-q] ARGS...", file=sys.stderr)
        return 2
    args = [arg for arg in argv[2:] if arg != "-q"]
    venv = Path(sys.executable).parent.parent
    uv = find_uv(venv)
    env = dict(os.environ)
    env.setdefault("UV_CACHE_DIR", str(venv / ".uv" / "cache"))  # goes with the venv: `rm -r .venv` frees it all
    options = uv_options(pip_settings(), env)
    if uv is None or options is None:
        return pip(args)
    # unsafe-best-match: like pip, the newest version on any index, not only on the first index that has the name
    command = [uv, "pip", "install", "-q", "--python", sys.executable, "--index-strategy", "unsafe-best-match",
               "--compile-bytecode", *options, *args]
    return 0 if subprocess.call(command, env=env) == 0 else pip(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
