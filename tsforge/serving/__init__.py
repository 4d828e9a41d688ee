"""The running server: TorchServe's start/stop and worker plan, the v2 front before it, the pod's process, metrics."""
