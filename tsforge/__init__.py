"""tsforge: the toolkit's command line and what it drives.

`tsforge COMMAND` (or `python -m tsforge COMMAND`) runs each command; `tsforge --help` lists them (tsforge/_main.py).

- `tsforge.packaging`: from a model to a verified archive (new, archive, the variants wanted, verify, release tags)
- `tsforge.serving`: the running server (TorchServe's start/stop and worker plan, the v2 front, the pod's process)
- `tsforge.clients`: clients of a running server (predict, gRPC, deploy and rollback)
- `tsforge.kube`: the KServe bundle and its sizing

The served side lives in `handlers/`, which travels inside each `.mar`; `export/` declares and exports models.
"""

__all__: list[str] = []
