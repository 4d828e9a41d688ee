"""The KServe pod as `make kserve` writes it, run here: the ServingRuntime container's own command (read from the
YAML, not retyped) on the bundle's storage root, copied to a temp folder in place of KServe's mount, with free ports
in place of 8080 and 8081. Then the clients a pod's users have: tritonclient over REST and gRPC, KServe's own
clients (in a subprocess: kserve and tritonclient.grpc register the same protos), v1 predict and /predictions; a
form flood and an oversize body refused at the front; TorchServe on 127.0.0.1 only, the front on the pod's ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import yaml
from tritonclient.utils import InferenceServerException

from tests.conftest import ROOT, built_archive
from tests.test_front import KSERVE_CLIENTS, agrees, direct
from tests.v2_inputs import as_json_strings, inputs_for
from tsforge.kube import kserve
from tsforge.serving.front_guard import FieldCounter
from tsforge.serving.server import TorchServe, free_ports

MODEL = "digits"
START_S = 300.0  # the pod's start (TorchServe, the workers' `auto` measurement, the front) on a busy 2-core box
STOP_S = 30.0  # tsforge.serving.server's stop bound (10 + 3 s) with room


@dataclass
class Pod:
    process: subprocess.Popen[bytes]
    rest: str  # host:port
    grpc: str
    http_port: int
    grpc_port: int
    run_dir: Path
    log: Path

    @property
    def torchserve(self) -> TorchServe:
        return TorchServe.attach(self.run_dir)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built_archive(MODEL)
    out = tmp_path_factory.mktemp("kserve")
    subprocess.run(["make", "-s", "kserve", f"MODELS={MODEL}", f"KSERVE_OUT={out}"], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    return out


def container_commands(bundle: Path) -> list[list[str]]:
    """The ServingRuntimes' container commands + args: the CPU and GPU runtimes' differ only in --device."""
    runtimes = [d for d in yaml.safe_load_all((bundle / "manifests" / "servingruntimes.yaml").read_text()) if d]
    commands = [[*c["command"], *c["args"]] for r in runtimes for c in r["spec"]["containers"]]
    devices = [c[c.index("--device") + 1] for c in commands]
    assert sorted(devices) == ["cpu", "gpu"], commands
    assert commands[0] == [devices[0] if arg == devices[1] else arg for arg in commands[1]], commands
    return commands


def container_command(bundle: Path) -> list[str]:
    """The CPU runtime's command (the GPU runtime's is run with fake GPUs in tests/test_gpus.py)."""
    return next(c for c in container_commands(bundle) if c[c.index("--device") + 1] == "cpu")


def localized(command: list[str], mount: Path, http_port: int, grpc_port: int) -> list[str]:
    """The container's command with the temp mount and free ports in place of KServe's; `python` is this one."""
    swapped = {kserve.MOUNT: str(mount), str(kserve.HTTP_PORT): str(http_port),
               str(kserve.GRPC_FRONT_PORT): str(grpc_port)}
    argv = [swapped.get(arg, arg) for arg in command]
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def wait_serving(process: subprocess.Popen[bytes], log: Path) -> Path:
    """The run dir the pod's command names once it serves; fails with its log if it exits or takes too long."""
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.is_file() else ""
        for line in text.splitlines():
            if line.startswith("serving ") and "run dir: " in line:
                return Path(line.rsplit("run dir: ", 1)[1].strip())
        if process.poll() is not None:
            pytest.fail(f"the pod's command exited {process.returncode}:\n{text[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"the pod's command did not serve within {START_S:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


def start_pod(bundle: Path, tmp: Path, command: list[str] | None = None) -> Pod:
    mount = tmp / "mnt" / "models"
    shutil.copytree(bundle / "storage" / MODEL, mount)
    http_port, grpc_port = free_ports(2)
    log = tmp / "pod.log"
    with log.open("wb") as out:
        # TMPDIR: the pod's run dir (a temp dir by default) lands in pytest's tmp, not in /tmp for good
        argv = localized(command or container_command(bundle), mount, http_port, grpc_port)
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env={**os.environ, "TMPDIR": str(tmp)})
    try:
        run_dir = wait_serving(process, log)
    except BaseException:
        stop_pod(process)
        raise
    return Pod(process, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", http_port, grpc_port, run_dir, log)


def stop_pod(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM as the kubelet sends it; SIGKILL to the whole tree if it does not end within STOP_S."""
    tree = [process.pid, *(p.pid for p in psutil.Process(process.pid).children(recursive=True))] \
        if process.poll() is None else []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=STOP_S)
    finally:
        for pid in tree:  # nothing may outlive the test, whatever happened
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def pod(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    started = start_pod(bundle, tmp_path_factory.mktemp("pod"))
    yield started
    stop_pod(started.process)


def test_form_fields_are_counted_across_chunks() -> None:
    body = b"--XyZ\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n" * 3 + b"--XyZ--\r\n"
    for size in (1, 2, 3, 7, len(body)):  # every split of the delimiter over two chunks
        counter = FieldCounter.for_content_type('multipart/form-data; boundary="XyZ"')
        assert counter is not None
        for at in range(0, len(body), size):
            counter.feed(body[at:at + size])
        assert counter.fields == 3, size
    urlencoded = FieldCounter.for_content_type("application/x-www-form-urlencoded; charset=utf-8")
    assert urlencoded is not None and urlencoded.feed(b"a=1&b=2") == 2 and urlencoded.feed(b"&c=3") == 3
    assert FieldCounter.for_content_type("application/json") is None
    with pytest.raises(ValueError, match="boundary"):
        FieldCounter.for_content_type("multipart/form-data")


def test_both_runtimes_run_tsforge_pod_on_the_mount_and_kserves_ports(bundle: Path) -> None:
    command = container_command(bundle)
    assert command[:4] == ["python", "-m", "tsforge", "pod"]
    assert command[command.index("--mount") + 1] == kserve.MOUNT
    assert (command[command.index("--http-port") + 1], command[command.index("--grpc-port") + 1]) == ("8080", "8081")
    runtime = next(d for d in yaml.safe_load_all((bundle / "manifests" / "servingruntimes.yaml").read_text()) if d)
    container = runtime["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == "8080"


@pytest.mark.integration
def test_torchserve_listens_on_loopback_only_and_the_front_on_the_pods_ports(pod: Pod) -> None:
    root = psutil.Process(pod.process.pid)
    java: list[Any] = []
    others: list[Any] = []
    for process in [root, *root.children(recursive=True)]:
        connections = getattr(process, "net_connections", None) or process.connections  # psutil < 6: connections
        listening = [c.laddr for c in connections("inet") if c.status == psutil.CONN_LISTEN]
        (java if process.name() == "java" else others).extend(listening)
    assert len(java) >= 5, java  # inference, management, metrics, gRPC inference and management
    assert {a.ip for a in java} <= {"127.0.0.1", "::ffff:127.0.0.1"}, java
    assert {a.port for a in others} == {pod.http_port, pod.grpc_port}, others
    assert {a.ip for a in others} <= {"0.0.0.0", "::"}, others  # the pod's network: every interface


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_tritonclient_health_metadata_infer_and_bad_input(pod: Pod, protocol: str) -> None:
    client: Any = triton_http.InferenceServerClient(pod.rest) if protocol == "rest" else \
        triton_grpc.InferenceServerClient(pod.grpc)
    module: Any = triton_http if protocol == "rest" else triton_grpc
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    metadata = client.get_model_metadata(MODEL, as_json=True) if protocol == "grpc" else \
        client.get_model_metadata(MODEL)
    declared = yaml.safe_load((ROOT / "config" / "models" / f"{MODEL}.yaml").read_text())["v2"]
    assert [t["name"] for t in metadata["inputs"]] == [t["name"] for t in declared["inputs"]]
    name, datatype, array = inputs_for(MODEL)
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(np.array([x.encode() for x in as_json_strings(MODEL, array)], dtype=np.object_)
                               if protocol == "rest" else array)
    result = client.infer(MODEL, [tensor])
    expected = direct(pod.torchserve, MODEL)
    agrees(MODEL, {n: result.as_numpy(n) for n in expected}, expected)
    bad = module.InferInput(name, [1], datatype)
    bad.set_data_from_numpy(np.array([b"bm90IGFuIGltYWdl" if protocol == "rest" else b"not an image"],
                                     dtype=np.object_))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [bad])
    assert ("400" if protocol == "rest" else "INVALID_ARGUMENT") in str(caught.value.status()), caught.value
    assert "image" in str(caught.value.message())


@pytest.mark.integration
def test_bad_input_over_rest_is_a_json_4xx_naming_the_cause(pod: Pod) -> None:
    body = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["bm90IGFuIGltYWdl"]}]}
    answer = requests.post(f"http://{pod.rest}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert 400 <= answer.status_code < 500 and answer.json()["error"], answer.text
    missing = requests.get(f"http://{pod.rest}/v2/models/nope/ready", timeout=10)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


@pytest.mark.integration
def test_the_kserve_package_clients(pod: Pod) -> None:
    run = subprocess.run([sys.executable, "-c", KSERVE_CLIENTS, f"http://{pod.rest}", pod.grpc, MODEL],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["rest_live"] and found["rest_ready"] and found["grpc_live"] and found["grpc_ready"]
    assert found["models"][MODEL]["ready"]
    expected = direct(pod.torchserve, MODEL)
    for protocol in ("rest", "grpc"):
        agrees(MODEL, {n: np.array(v) for n, v in found["models"][MODEL][protocol].items()}, expected)


@pytest.mark.integration
def test_v1_predict_predictions_and_ping_reach_torchserve(pod: Pod) -> None:
    _, _, array = inputs_for(MODEL)
    torchserve = pod.torchserve.url("inference")
    instances = {"instances": [{"b64": x} for x in as_json_strings(MODEL, array)]}

    def answers(base: str) -> tuple[Any, list[Any]]:
        v1 = requests.post(f"{base}/v1/models/{MODEL}:predict", json=instances, timeout=60)
        raw = [requests.post(f"{base}/predictions/{MODEL}", data=png, timeout=60) for png in array]
        assert v1.status_code == 200 and all(r.status_code == 200 for r in raw), [v1.text, *(r.text for r in raw)]
        return v1.json(), [r.json() for r in raw]

    v1, raw = answers(f"http://{pod.rest}")
    assert (v1, raw) == answers(torchserve)  # TorchServe's own answers, unchanged
    assert [p["label"] for p in v1["predictions"]] == [r["label"] for r in raw]
    bad = requests.post(f"http://{pod.rest}/predictions/{MODEL}", data=b"not an image", timeout=60)
    assert bad.status_code == 400 and "image" in bad.json()["message"]  # the handler's own 4xx
    unknown = requests.post(f"http://{pod.rest}/predictions/nope", data=b"x", timeout=60)
    assert unknown.status_code == 404 and "digits" in unknown.json()["message"]
    assert requests.get(f"http://{pod.rest}/v1/models/{MODEL}", timeout=10).json() == {"name": MODEL, "ready": True}
    assert requests.get(f"http://{pod.rest}/ping", timeout=10).json()["status"] == "Healthy"
    assert "ts_inference_requests_total" in requests.get(f"http://{pod.rest}/metrics", timeout=10).text


@pytest.mark.integration
def test_form_floods_and_oversize_bodies_are_refused_at_the_front(pod: Pod) -> None:
    url = f"http://{pod.rest}/predictions/{MODEL}"
    flood = b"&".join([b"abcd=ef"] * 800_000)  # 6.4 MB of tiny fields: about 12 s of TorchServe's decoder
    started = time.monotonic()
    answer = requests.post(url, data=flood, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    assert answer.status_code == 413 and "1000 fields" in answer.json()["error"], answer.text
    assert time.monotonic() - started < 5
    parts = {f"f{n}": ("x", b"1") for n in range(1001)}
    answer = requests.post(url, files=parts, timeout=60)
    assert answer.status_code == 413 and "multipart/form-data" in answer.json()["error"], answer.text
    _, _, array = inputs_for(MODEL)
    one_field = requests.post(url, files={"data": ("digit.png", array[0], "image/png")}, timeout=60)
    raw = requests.post(url, data=array[0], timeout=60)
    assert one_field.status_code == 200 and one_field.json() == raw.json()  # a real form still reaches the handler
    small_form = requests.post(url, data={"data": "not an image"}, timeout=60)
    assert small_form.status_code == 400 and "code" in small_form.json()  # TorchServe's handler answered it
    oversize = requests.post(url, data=b"x" * 7_000_000, timeout=60)
    assert oversize.status_code == 413 and "max_request_size" in oversize.json()["error"]
    assert requests.get(f"http://{pod.rest}/v2/models/{MODEL}/ready", timeout=10).status_code == 200


@pytest.mark.integration
def test_sigterm_stops_torchserve_and_the_front(pod: Pod) -> None:
    tree = [pod.process.pid, *(p.pid for p in psutil.Process(pod.process.pid).children(recursive=True))]
    assert len(tree) >= 4  # the command, TorchServe's launcher and frontend, a worker, the front
    pod.process.send_signal(signal.SIGTERM)
    assert pod.process.wait(timeout=STOP_S) == 0, pod.log.read_text(errors="replace")[-2000:]
    assert not [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


@pytest.mark.integration
def test_when_torchserve_dies_the_pod_exits_1_and_takes_the_front(bundle: Path, tmp_path: Path) -> None:
    pod = start_pod(bundle, tmp_path)
    try:
        root = psutil.Process(pod.process.pid)
        java = [p for p in root.children(recursive=True) if p.name() == "java"]
        front = int((pod.run_dir / "front.pid").read_text())
        assert java and psutil.pid_exists(front)
        java[0].kill()  # as the OOM killer would
        assert pod.process.wait(timeout=STOP_S) == 1  # the kubelet restarts the container
        assert "error: TorchServe exited" in pod.log.read_text(errors="replace")
        assert not psutil.pid_exists(front) or psutil.Process(front).status() == psutil.STATUS_ZOMBIE
    finally:
        stop_pod(pod.process)
