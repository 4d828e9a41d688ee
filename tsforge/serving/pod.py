"""What a KServe pod runs (the ServingRuntime's command, `make kserve`): `make serve`'s TorchServe and v2 front.

    python -m tsforge pod [--mount /mnt/models] [--http-port 8080] [--grpc-port 8081] [--host 0.0.0.0]
                          [--device auto|cpu|gpu]

KServe mounts the storage root (config/config.properties, config/config-gpu.properties, model-store/*.mar) at
--mount. Each ServingRuntime names its device: `cpu` starts TorchServe from config.properties (the archive's CPU
settings) and gives it no GPU (number_of_gpu=0); `gpu` from config-gpu.properties (the `gpu:` settings, one GPU's
worth of workers), and as `make serve` does, scales each model to workers_per_gpu x the GPUs visible here
(tsforge/serving/gpus.py); `auto` is gpu where a GPU is visible. TorchServe starts from that configuration with
every one of its addresses on 127.0.0.1 at free ports, whatever the configuration or the TS_* environment says: its
Java frontend (netty 4.1.53, no longer fixed) is never on the pod network. The front
(tsforge/serving/front.py) takes the pod's ports, KServe's conventions: REST on 8080 (v2, v1 predict, /predictions,
/ping, /metrics) and gRPC on 8081 (inference.GRPCInferenceService), and refuses what TorchServe's decoders
would choke on before it reaches them (tsforge/serving/front_guard.py). The models are the configuration's
model_snapshot (what `make kserve` writes), else every NAME.mar in the store.

The command supervises both: when either exits, the other is stopped and the command exits 1, so the kubelet
restarts the container; SIGTERM (a pod being deleted or scaled in) stops both and exits 0. The run folder
(rendered configuration, logs, TorchServe's ports) is printed at start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import types
from pathlib import Path

from tsforge.kube.kserve import CONFIG_FILES, DEVICES, GRPC_FRONT_PORT, HTTP_PORT, MOUNT
from tsforge.serving import frontproc, gpus, procgroup
from tsforge.serving.server import KEY_FILE, PATH_KEYS, TorchServe, free_port_overrides, model_args, read_properties

#: what puts TorchServe's own listeners on 127.0.0.1, over anything the mounted configuration says
#: where the front listens in a pod: every interface, since the kubelet's probes and KServe's clients come from the
#: pod's network; the front is the only listener there (its token rule, form and size guards), TorchServe is not
POD_NETWORK = "0.0.0.0"
LOOPBACK = {"grpc_inference_address": "127.0.0.1", "grpc_management_address": "127.0.0.1"}
#: TorchServe's environment overrides (enable_envvars_config) that could move a listener off loopback
ADDRESS_ENV = ("TS_INFERENCE_ADDRESS", "TS_MANAGEMENT_ADDRESS", "TS_METRICS_ADDRESS", "TS_GRPC_INFERENCE_ADDRESS",
               "TS_GRPC_MANAGEMENT_ADDRESS", "TS_GRPC_INFERENCE_PORT", "TS_GRPC_MANAGEMENT_PORT")
POLL_S = 1.0
TAIL_LINES = 20  # of each log, on stderr when the pod fails: what `kubectl logs --previous` shows


class Stopped(Exception):
    """SIGTERM or SIGINT arrived."""


def served_models(config: Path, store: Path) -> tuple[list[str], bool]:
    """(model names, whether the configuration registers them itself through model_snapshot)."""
    snapshot = read_properties(config).get("model_snapshot")
    if snapshot:
        return sorted(json.loads(snapshot)["models"]), True
    return sorted(path.stem for path in store.glob("*.mar")), False


def loopback_overrides() -> dict[str, str]:
    """Free loopback ports for TorchServe's five listeners, chosen here rather than in the mounted configuration:
    sidecars (Knative's queue-proxy, Istio's proxy) share the pod's loopback, and a fixed port could be theirs."""
    ports = free_port_overrides()
    return {**{k: v for k, v in ports.items() if k not in frontproc.PORT_KEYS}, **LOOPBACK}


def device_config(mount: Path, device: str) -> tuple[str, Path, dict[str, str]]:
    """(the device served, its configuration under `mount`, the overrides that device needs): `auto` is gpu where
    a GPU is visible; cpu hands TorchServe no GPU, so no worker takes one and none is scaled per GPU."""
    if device == "auto":
        device = "gpu" if gpus.visible_gpus() > 0 else "cpu"
    return device, mount / "config" / CONFIG_FILES[device], {gpus.GPU_COUNT_KEY: "0"} if device == "cpu" else {}


def mounted_paths(config: Path, mount: Path) -> dict[str, str]:
    """The configuration's paths under KServe's mount point, moved under `mount` where that is elsewhere (a local
    run of the pod's command on a copy of the storage root)."""
    found = {}
    for key, value in read_properties(config).items():
        if key in PATH_KEYS and value.startswith(f"{MOUNT}/") and mount != Path(MOUNT):
            found[key] = str(mount / value.removeprefix(f"{MOUNT}/"))
    return found


def drop_address_environment() -> None:
    for name in ADDRESS_ENV:
        if os.environ.pop(name, None) is not None:
            print(f"warning: ignoring {name}: TorchServe listens on loopback only in the pod", file=sys.stderr)


def _raise_stopped(signum: int, frame: types.FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


def supervise(server: TorchServe, front_pid: int) -> str:
    """Wait until TorchServe or the front exits (a signal ends the wait with Stopped); what exited."""
    while True:
        if not server.running():
            return "TorchServe exited"
        procgroup.reap(front_pid)  # the front is our child: an exited one stays a zombie until reaped
        if not procgroup.pid_alive(front_pid):
            return "the v2 front exited"
        time.sleep(POLL_S)


def start_front(server: TorchServe, models: list[str], args: argparse.Namespace) -> int:
    """The front on the pod's ports in front of a ready TorchServe; its pid."""
    props = {**server.props, "front_http_port": str(args.http_port), "front_grpc_port": str(args.grpc_port)}
    key_file = server.run_dir / KEY_FILE  # only with token authorization on (docs/security.md: the pod's token)
    frontproc.start(server.run_dir, props, server.url("inference"), models, key_file if key_file.is_file() else None,
                    timeout=args.timeout, host=args.host, metrics_url=server.url("metrics"))
    print(f"serving {', '.join(models)}: REST {args.host}:{args.http_port}, gRPC {args.host}:{args.grpc_port}; "
          f"TorchServe on 127.0.0.1 only (inference {server.url('inference')}); run dir: {server.run_dir}", flush=True)
    return int((server.run_dir / frontproc.PID_FILE).read_text())


def log_tails(logs: Path) -> str:
    """The end of TorchServe's, the workers' and the front's logs: a pod's files are gone once it restarts."""
    parts = []
    for name in ("ts_log.log", "model_log.log", frontproc.LOG_FILE):
        path = logs / name
        if path.is_file():
            lines = path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
            parts.append(f"--- {name} (last {len(lines)} lines)\n" + "\n".join(lines))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.serving.pod", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mount", type=Path, default=Path(MOUNT), help="the storage root KServe mounts")
    parser.add_argument("--http-port", type=int, default=HTTP_PORT, help="the front's REST port")
    parser.add_argument("--grpc-port", type=int, default=GRPC_FRONT_PORT, help="the front's gRPC port")
    parser.add_argument("--host", default=POD_NETWORK, help="the address the front's ports listen on (default: every "
                        "interface, the pod's network, where the kubelet probes it and clients reach it; TorchServe "
                        "stays on 127.0.0.1)")
    parser.add_argument("--run-dir", type=Path, help="logs and rendered configuration (default: a new temp dir)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds TorchServe and the front get to start")
    parser.add_argument("--device", choices=["auto", *DEVICES], default="auto",
                        help="whose settings to serve (the ServingRuntime's); auto: gpu where a GPU is visible")
    args = parser.parse_args(argv)
    device, config, device_overrides = device_config(args.mount, args.device)
    store = args.mount / "model-store"
    if not config.is_file():
        parser.error(f"no {config}: --mount must be a storage root written by `tsforge kserve`")
    models, registered = served_models(config, store)
    if not models:
        parser.error(f"no model in {config} (model_snapshot) nor in {store}")
    drop_address_environment()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="tsforge-pod-"))
    server = TorchServe(config=config, run_dir=run_dir, model_store=store,
                        models=() if registered else model_args(models),
                        overrides={**mounted_paths(config, args.mount), **device_overrides, **loopback_overrides()})
    print(f"{device.upper()} settings from {config}; GPUs: {server.props.get(gpus.GPU_COUNT_KEY, 'all visible')}",
          flush=True)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_stopped)
    exited: str | None = None
    try:
        server.start()
        server.wait_ready(models, timeout=args.timeout)
        exited = supervise(server, start_front(server, models, args))
    except Stopped as signalled:
        print(f"{signalled}: stopping", flush=True)
    except (frontproc.FrontError, OSError, RuntimeError) as exc:
        exited = str(exc)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)  # no second signal while stopping
        server.stop()
    if exited:
        print(f"{log_tails(server.run_dir / 'logs')}\nerror: {exited}; see {server.run_dir / 'logs'}", file=sys.stderr,
              flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
