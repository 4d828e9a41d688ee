"""Write a KServe bundle for the archives in the model store: `make kserve`.

    python -m tsforge.kube.kserve [--out build/kserve] [--store model_store] [--models digits resnet18]
                             [--storage-uri pvc://tsforge-models] [--image tsforge-torchserve] [--max-replicas 8]

Layout (one storage root per model, so each model scales on its own):

    OUT/storage/NAME/config/config.properties   TorchServe's configuration as KServe's TorchServe layout wants it,
                                                with the archive's CPU settings: the CPU runtime's
    OUT/storage/NAME/config/config-gpu.properties  the same with the archive's `gpu:` settings: the GPU runtime's
                                                (`tsforge pod --device gpu`), whatever host packaged the archive
    OUT/storage/NAME/config/metrics.yaml        the project's metrics configuration
    OUT/storage/NAME/model-store/NAME.mar       the archive (hard-linked from the store where possible)
    OUT/manifests/storage.yaml                  with a pvc:// storage URI: the claim and a pod to copy into it
    OUT/manifests/servingruntimes.yaml          ServingRuntimes tsforge-torchserve-{cpu,gpu} (deploy/Dockerfile):
                                                `python -m tsforge pod` (tsforge/serving/pod.py), TorchServe on loopback
                                                and the v2 front on the pod's ports
    OUT/manifests/inferenceservices-{v1,v2}-{cpu,gpu}.yaml   one InferenceService per model
    OUT/DERIVATION.md                           how each replica's resources and autoscaling target were derived
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tsforge.kube import capacity
from tsforge.project import ROOT, project_version
from tsforge.serving import gpus, jobqueue

MOUNT = "/mnt/models"  # where KServe's storage initializer puts the storage URI's contents
HTTP_PORT = 8080  # the front's REST port: KServe's and Knative's convention
GRPC_FRONT_PORT = 8081  # the front's gRPC port (inference.GRPCInferenceService): KServe's model server's convention
#: the pod's command (tsforge/serving/pod.py); the image sets PYTHONPATH to the project (deploy/Dockerfile)
POD_COMMAND = ["python", "-m", "tsforge", "pod"]
MAX_FORM_FIELDS = 1000  # tsforge/serving/front_guard.py's default, written out so an operator sees and can change it
PROTOCOLS = ("v1", "v2")
DEVICES = ("cpu", "gpu")
#: each runtime's TorchServe configuration under the storage root's config/: KServe's TorchServe layout names the
#: first; `tsforge pod --device DEVICE` reads its own
CONFIG_FILES = {"cpu": "config.properties", "gpu": "config-gpu.properties"}
LOADER_IMAGE = "busybox:1.36.1"
GPU_EXTRA_MEMORY_MIB = 2048  # CUDA context and pinned buffers; not measured here


@dataclass(frozen=True)
class Archive:
    path: Path
    name: str
    version: str
    config: dict[str, Any]

    def settings(self, device: str = "cpu") -> dict[str, Any]:
        """model-config.yaml as it applies on `device`, whatever host packaged the archive (gpus.device_settings)."""
        return gpus.device_settings(self.config, device)

    def workers_on(self, device: str) -> int:
        c = self.settings(device)
        return int(c.get("maxWorkers", c.get("minWorkers", 1)))

    @property
    def workers(self) -> int:
        """CPU workers: what the measured figures and the sizing fallback are for."""
        return self.workers_on("cpu")

    @property
    def batch_size(self) -> int:
        return int(self.settings("cpu").get("batchSize", 1))


def read_archive(path: Path) -> Archive:
    """The model name, version and model-config.yaml that a .mar carries."""
    with zipfile.ZipFile(path) as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        config_file = manifest.get("configFile")
        config = yaml.safe_load(mar.read(config_file)) if config_file else {}
    return Archive(path, manifest["modelName"], str(manifest.get("modelVersion", "1.0")), config or {})


def k8s_name(model: str) -> str:
    """A DNS-1035 label for a model name (digits_tensor -> digits-tensor)."""
    return model.lower().replace("_", "-").replace(".", "-")


def snapshot(archive: Archive, device: str = "cpu") -> dict[str, Any]:
    """TorchServe's model_snapshot: the model, registered at start with its archive's settings for `device` (on
    gpu, workers_per_gpu counts one GPU's worth: the pod scales it to the GPUs it sees)."""
    c = archive.settings(device)
    entry = {"defaultVersion": True, "marName": archive.path.name, "minWorkers": int(c.get("minWorkers", 1)),
             "maxWorkers": archive.workers_on(device), "batchSize": int(c.get("batchSize", 1)),
             "maxBatchDelay": int(c.get("maxBatchDelay", 100)), "responseTimeout": int(c.get("responseTimeout", 120))}
    return {"name": "startup.cfg", "modelCount": 1, "models": {archive.name: {archive.version: entry}}}


def config_properties(archive: Archive, device: str = "cpu") -> str:
    """config/config.properties (cpu) or config/config-gpu.properties (gpu) for KServe's TorchServe storage
    layout."""
    lines = [
        f"# TorchServe configuration for {archive.name} {archive.version} on KServe, {device.upper()} runtime "
        "(written by tsforge.kube.kserve).",
        f"# KServe mounts the storage URI at {MOUNT}. The pod runs `python -m tsforge pod` (tsforge/serving/pod.py), "
        f"which",
        "# starts TorchServe with every address on 127.0.0.1 at free ports (whatever is written here or in TS_*",
        f"# variables) and the v2 front on the pod's ports: REST {HTTP_PORT} (v2, v1 /v1/models/NAME:predict,",
        f"# /predictions/NAME, /ping, /metrics) and gRPC {GRPC_FRONT_PORT}. The model is registered from",
        f"# model_snapshot, with the archive's {device.upper()} settings"
        + (": workers_per_gpu, scaled to the GPUs the pod sees." if device == "gpu" else "."),
        "inference_address=http://127.0.0.1:8080",
        "management_address=http://127.0.0.1:8081",
        "metrics_address=http://127.0.0.1:8082",
        "grpc_inference_address=127.0.0.1",
        "grpc_management_address=127.0.0.1",
        "grpc_inference_port=7070",
        "grpc_management_port=7071",
        "# The front refuses form bodies with more fields (413) before TorchServe's own decoder sees them.",
        f"front_max_form_fields={MAX_FORM_FIELDS}",
        "enable_grpc_ssl=false",
        "ts_open_inference_protocol=true",
        "enable_metrics_api=true",
        "metrics_mode=prometheus",
        f"metrics_config={MOUNT}/config/metrics.yaml",
        "# TS_* environment variables of the InferenceService override these settings.",
        "enable_envvars_config=true",
        "# The serving image carries every handler dependency (deploy/Dockerfile): nothing is installed at start.",
        "install_py_dep_per_model=false",
        f"model_store={MOUNT}/model-store",
        "allowed_urls=file://.*\\\\.mar",
        "# Only the front is on the pod network; clients are authenticated at the ingress (docs/security.md).",
        "disable_token_authorization=true",
        "enable_model_api=false",
        f"job_queue_size={jobqueue.JOB_QUEUE_SIZE}",  # tsforge/serving/jobqueue.py: no 503 up to concurrency 1,024
        "default_response_timeout=60",
        "model_snapshot=" + json.dumps(snapshot(archive, device), separators=(",", ":")),
        "",
    ]
    return "\n".join(lines)


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_storage(archive: Archive, out: Path) -> Path:
    root = out / "storage" / archive.name
    (root / "config").mkdir(parents=True, exist_ok=True)
    for device in DEVICES:
        (root / "config" / CONFIG_FILES[device]).write_text(config_properties(archive, device))
    shutil.copy2(ROOT / "config" / "metrics.yaml", root / "config" / "metrics.yaml")
    _place(archive.path, root / "model-store" / archive.path.name)
    return root


def runtime_name(device: str) -> str:
    return f"tsforge-torchserve-{device}"


def serving_runtime(device: str, image: str) -> dict[str, Any]:
    """A namespaced ServingRuntime that runs `tsforge pod` from the project's image on the bundle's layout:
    TorchServe on loopback, the v2 front on the pod's ports. Knative routes one port, REST; the front's gRPC port
    is reachable on the pod's address (docs/scaling.md)."""
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": runtime_name(device), "labels": {"app.kubernetes.io/part-of": "tsforge"}},
        "spec": {
            # the front answers GET /metrics with TorchServe's metrics (read on loopback)
            "annotations": {"prometheus.kserve.io/port": str(HTTP_PORT), "prometheus.kserve.io/path": "/metrics"},
            "supportedModelFormats": [{"name": "pytorch", "version": "1", "autoSelect": False}],
            "protocolVersions": list(PROTOCOLS),
            "containers": [{
                "name": "kserve-container",
                "image": image,
                "command": list(POD_COMMAND),
                "args": ["--mount", MOUNT, "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_FRONT_PORT),
                         "--device", device],
                "ports": [{"containerPort": HTTP_PORT, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT}, "periodSeconds": 5},
                "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
                                    "privileged": False, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }


def pvc_name(storage_uri: str) -> str | None:
    """The claim of a pvc://CLAIM[/path] storage URI, else None."""
    if not storage_uri.startswith("pvc://"):
        return None
    return storage_uri.removeprefix("pvc://").split("/", 1)[0]


def storage_manifests(claim: str, archives: list[Archive]) -> list[dict[str, Any]]:
    """A PersistentVolumeClaim for the storage roots and a pod to copy them in with `kubectl cp`."""
    size_gib = max(1, math.ceil(2 * sum(a.path.stat().st_size for a in archives) / 2**30))
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "labels": {"app.kubernetes.io/part-of": "tsforge"}},
        # Replicas on several nodes read it at once: the storage class must offer ReadWriteMany.
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": f"{size_gib}Gi"}}},
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{claim}-loader", "labels": {"app.kubernetes.io/part-of": "tsforge"}},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
            "containers": [{
                "name": "loader",
                "image": LOADER_IMAGE,
                "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "models", "mountPath": MOUNT}],
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                              "limits": {"cpu": "500m", "memory": "128Mi"}},
            }],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": claim}}],
            "restartPolicy": "Never",
        },
    }
    return [pvc, pod]


def _resources(sizing: capacity.Sizing, device: str) -> dict[str, Any]:
    memory = sizing.memory_mib + (GPU_EXTRA_MEMORY_MIB if device == "gpu" else 0)
    amount: dict[str, str] = {"cpu": str(sizing.cpu), "memory": f"{memory}Mi"}
    if device == "gpu":
        amount["nvidia.com/gpu"] = "1"
    return {"requests": dict(amount), "limits": dict(amount)}


def inference_service(archive: Archive, sizing: capacity.Sizing, protocol: str, device: str, storage_uri: str,
                      max_replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": f"{k8s_name(archive.name)}-{protocol}-{device}",
            "labels": {"app.kubernetes.io/part-of": "tsforge", "app.kubernetes.io/version": archive.version},
            # Concurrency-based autoscaling is Knative's (KPA): the Serverless mode.
            "annotations": {"serving.kserve.io/deploymentMode": "Serverless"},
        },
        "spec": {"predictor": {
            "minReplicas": 1,
            "maxReplicas": max_replicas,
            "scaleMetric": "concurrency",
            "scaleTarget": sizing.target_concurrency,
            "model": {
                "modelFormat": {"name": "pytorch"},
                "runtime": runtime_name(device),
                "protocolVersion": protocol,
                "storageUri": f"{storage_uri.rstrip('/')}/{archive.name}",
                "resources": _resources(sizing, device),
            },
        }},
    }


class _Dumper(yaml.SafeDumper):
    """Block sequences indented under their key, as yamllint's default indentation rule wants."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _comment(lines: list[str]) -> str:
    return "".join(f"# {wrapped}\n" for line in lines for wrapped in textwrap.wrap(line, 110))


def _yaml_documents(header: list[str], documents: list[tuple[list[str], dict[str, Any]]]) -> str:
    parts = [_comment(header)]
    for comments, document in documents:
        parts.append("---\n" + _comment(comments)
                     + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=120))
    return "".join(parts)


def derivation(archives: list[Archive], sizings: dict[str, capacity.Sizing], max_replicas: int) -> str:
    lines = [
        "# How the InferenceServices are sized (written by `python -m tsforge.kube.kserve`)",
        "",
        "Every figure comes from `make bench` (single host, closed loop of N clients, only correct answers count),",
        "as committed in `docs/data/bench-NAME.json` (the file named in the source column). The rule, from",
        "`tsforge/kube/capacity.py`:",
        "",
        f"- **target concurrency** (`scaleMetric: concurrency`, `scaleTarget`): the smallest measured concurrency "
        f"whose throughput reaches {capacity.KNEE_SHARE:.0%} of the best measured one; past it more requests in "
        "flight only queue. Knative keeps each replica near "
        f"{capacity.KNATIVE_TARGET_UTILIZATION:.0%} of it (its default target utilisation) before adding one.",
        "- **capacity** per replica: the throughput measured at that concurrency.",
        "- **CPU**: the measured host's cores, requests = limits (the bench's load generator shared those cores, "
        "so a replica that has them alone does at least as well).",
        f"- **memory**: peak RSS of TorchServe's frontend and workers at that concurrency x "
        f"{capacity.MEMORY_HEADROOM:g}, rounded up to {capacity.MEMORY_STEP_MIB} MiB; requests = limits "
        f"(Guaranteed QoS). GPU variants add {GPU_EXTRA_MEMORY_MIB} MiB for the CUDA context (not measured).",
        "- **not measured** (fallback): target = maxWorkers x batchSize of the archive's model-config.yaml (one full",
        "  batch per worker in flight: the measured knee of ResNet-18), CPU and memory of the largest measured model.",
        "- **GPU**: no GPU run is in the benchmarks, so the GPU variants keep the CPU target concurrency, which fills",
        "  every worker's batch; replace it with `make bench-gpu` figures for the GPU in use.",
        f"- `minReplicas: 1` (no cold start from zero), `maxReplicas: {max_replicas}` (`--max-replicas`).",
        "",
        "| model | version | workers x batch | source | target concurrency | capacity req/s per replica "
        "| replicas for 1,000 req/s | CPU | memory MiB (CPU / GPU variant) |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for archive in archives:
        s = sizings[archive.name]
        capacity_cell = f"{s.capacity_qps:g}" if s.capacity_qps else "not measured"
        replicas = s.replicas_for(1000)
        lines.append(
            f"| {archive.name} | {archive.version} | {archive.workers} x {archive.batch_size} "
            f"| {s.measured.source if s.measured else 'fallback'} | {s.target_concurrency} | {capacity_cell} "
            f"| {replicas if replicas else '-'} | {s.cpu} | {s.memory_mib} / {s.memory_mib + GPU_EXTRA_MEMORY_MIB} |")
    lines += ["", "Per model:", ""]
    lines += [f"- **{a.name}**: {sizings[a.name].reason}." for a in archives]
    lines += ["", "Replicas for a load of L req/s: ceil(L / (capacity x "
              f"{capacity.KNATIVE_TARGET_UTILIZATION:g})). Deploying: docs/scaling.md.", ""]
    return "\n".join(lines)


def write_bundle(out: Path, archives: list[Archive], storage_uri: str, image: str, max_replicas: int,
                 measured: dict[str, capacity.Measurement]) -> list[Path]:
    """Write the bundle; returns the files written, storage first."""
    written: list[Path] = []
    sizings = {a.name: capacity.size(a.name, a.workers, a.batch_size, measured) for a in archives}
    for archive in archives:
        root = write_storage(archive, out)
        written += sorted(p for p in root.rglob("*") if p.is_file())
    manifests = out / "manifests"
    manifests.mkdir(parents=True, exist_ok=True)
    runtimes = manifests / "servingruntimes.yaml"
    runtimes.write_text(_yaml_documents(
        ["ServingRuntimes for the tsforge image (deploy/Dockerfile): CPU and GPU builds of the same Dockerfile.",
         "Apply into the namespace of the InferenceServices before them."],
        [([f"{device.upper()} image"], serving_runtime(device, f"{image}-{device}")) for device in DEVICES]))
    written.append(runtimes)
    claim = pvc_name(storage_uri)
    if claim:
        path = manifests / "storage.yaml"
        path.write_text(_yaml_documents(
            [f"Storage for {storage_uri}: the claim, and a pod to copy build/kserve/storage/ into it "
             "(docs/scaling.md).",
             "Delete the pod once the copy is done. Not needed with s3:// or gs:// storage."],
            [([], document) for document in storage_manifests(claim, archives)]))
        written.append(path)
    for protocol in PROTOCOLS:
        for device in DEVICES:
            documents = []
            for archive in archives:
                s = sizings[archive.name]
                documents.append(([f"{archive.name}: scaleTarget {s.target_concurrency}, {s.reason}."],
                                  inference_service(archive, s, protocol, device, storage_uri, max_replicas)))
            path = manifests / f"inferenceservices-{protocol}-{device}.yaml"
            path.write_text(_yaml_documents(
                [f"KServe InferenceServices, protocol {protocol}, {device.upper()}: one per model, each with its own",
                 f"storage root under {storage_uri}. Resources and autoscaling: ../DERIVATION.md."], documents))
            written.append(path)
    (out / "DERIVATION.md").write_text(derivation(archives, sizings, max_replicas))
    written.append(out / "DERIVATION.md")
    return written


def select_archives(store: Path, models: list[str] | None) -> list[Archive]:
    """The named models' archives (NAME.mar), or every archive in the store named after its model."""
    if models:
        missing = [m for m in models if not (store / f"{m}.mar").is_file()]
        if missing:
            raise SystemExit(f"no archive for {', '.join(missing)} in {store} (make archive MODELS='...')")
        return [read_archive(store / f"{m}.mar") for m in models]
    archives = [read_archive(p) for p in sorted(store.glob("*.mar"))]
    return [a for a in archives if a.path.stem == a.name]


def measured_for(archives: list[Archive], required: bool) -> dict[str, capacity.Measurement]:
    """The committed measurements; each archive without one is named (an error when `required`)."""
    measured = capacity.measurements(ROOT)
    for archive in archives:
        if archive.name in measured:
            continue
        try:
            capacity.load(archive.name, ROOT)
        except capacity.MissingMeasurement as exc:
            if required:
                raise SystemExit(f"{exc}; --require-measured refuses the fallback") from exc
            print(f"note: {exc}; sized by the fallback (DERIVATION.md)", file=sys.stderr)
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsforge.kube.kserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "kserve")
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--models", nargs="*", help="models to bundle (default: every NAME.mar in the store)")
    parser.add_argument("--storage-uri", default="pvc://tsforge-models",
                        help="where the bundle's storage/ folder will be copied (s3://, gs://, pvc://...)")
    parser.add_argument("--image", default=f"tsforge-torchserve:{project_version()}",
                        help="the serving image built from deploy/Dockerfile, without the -cpu/-gpu suffix")
    parser.add_argument("--max-replicas", type=int, default=8)
    parser.add_argument("--require-measured", action="store_true",
                        help="fail when a model has no committed bench summary, instead of sizing it by the fallback")
    args = parser.parse_args(argv)
    archives = select_archives(args.store, args.models)
    if not archives:
        print(f"no archives in {args.store} (make archive)", file=sys.stderr)
        return 1
    measured = measured_for(archives, args.require_measured)
    written = write_bundle(args.out, archives, args.storage_uri, args.image, args.max_replicas, measured)
    for path in written:
        print(path.relative_to(args.out) if path.is_relative_to(args.out) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
