"""tsforge: the toolkit's command-line side (archive, serve, verify, deploy).

`tsforge COMMAND` (or `python -m tsforge COMMAND`) runs each of them; `tsforge --help` lists the commands
(tsforge/_main.py). The served side lives in `handlers/`, which travels inside each `.mar`; `export/` declares
models.
"""

__all__: list[str] = []
