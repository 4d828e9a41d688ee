"""tsforge: the toolkit's command-line side (archive, serve, verify, deploy).

The served side lives in `handlers/`, which travels inside each `.mar`; `export/` declares models.
"""

__all__: list[str] = []
