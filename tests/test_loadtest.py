"""`make loadtest` smoke runs (locust over REST and gRPC) and the answer checks behind them.

A load test that counts wrong answers as successes measures nothing, so these check both ways: a
canary payload with a wrong expectation, and a real server whose labels are wrong.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from loadtest.inprocess import prepared_cases
from loadtest.loadgen import load
from loadtest.payloads import Case, check, mislabel
from loadtest.tune import Setting, apply_to_config
from tests.conftest import BUILD, ROOT, StartServer, built_archive, configured_workers


def make_loadtest(reports: Path, *args: str) -> dict:
    subprocess.run(["make", "-s", "loadtest", "MODEL=digits", "USERS=4", "SPAWN_RATE=4", "DURATION=4",
                    f"REPORTS={reports}", *args], cwd=ROOT, check=True)
    return json.loads((reports / "loadtest" / f"digits-{'grpc' if 'PROTOCOL=grpc' in args else 'rest'}"
                       / "summary.json").read_text())


@pytest.fixture(scope="module")
def digits_cases() -> list[Case]:
    return prepared_cases("digits", built_archive("digits"))


def test_answer_check_demands_the_reference_answer() -> None:
    case = Case("c", b"", "image/png", {"label": "7", "probability": 0.9, "rtol": 0.05})
    assert check(case, 200, json.dumps({"label": "7", "probabilities": {"7": 0.91}}).encode()) is None
    assert "wrong label" in check(case, 200, json.dumps({"label": "1", "probabilities": {"1": 0.9}}).encode())
    assert "probability" in check(case, 200, json.dumps({"label": "7", "probabilities": {"7": 0.5}}).encode())
    assert check(case, 503, b"{}") == "HTTP 503"
    assert check(case, 200, b"not json") == "answer is not JSON"
    # TorchServe's stock classifiers answer {label: probability}
    assert check(case, 200, json.dumps({"7": 0.9, "1": 0.1}).encode()) is None
    # pytorch/serve's Hugging Face example handler answers the bare label, as text: accepted where the bench says so
    bare = Case("t", b"", "text/plain", {"label": "positive", "bare_label": True})
    assert check(bare, 200, b"positive") is None
    assert "wrong label" in check(bare, 200, b"negative")


def test_digits_payloads_are_varied_and_every_reference_is_the_true_label(digits_cases, digits_split) -> None:
    kinds = {c.content_type for c in digits_cases}
    assert {"image/png", "image/jpeg", "application/json"} <= kinds
    assert len({c.body for c in digits_cases}) == len(digits_cases)
    *_, y_test = digits_split
    # names carry the test-set index; the trained CNN is ~98% accurate, so nearly all references are the truth
    truth = [c.expect["label"] == str(y_test[int(c.name.split("-")[0].removeprefix("digit"))]) for c in digits_cases]
    assert sum(truth) >= len(truth) - 2


@pytest.mark.integration
def test_make_loadtest_rest_writes_locust_reports_and_counts_wrong_answers(tmp_path: Path) -> None:
    summary = make_loadtest(tmp_path, "LOADTEST_ARGS=--mislabel-every 4")
    out = tmp_path / "loadtest" / "digits-rest"
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust.html", "summary.json", "summary.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["tool"] == "locust" and summary["requests"] > 20 and summary["qps"] > 0
    # 8 of 32 payloads expect a wrong label: about a quarter of the requests must fail, for that reason only
    assert 0.6 < summary["success_rate"] < 0.9
    assert summary["failures"] == sum(summary["failure_reasons"].values()) > 0
    assert all(reason.startswith("wrong label") for reason in summary["failure_reasons"])
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    server = summary["server"]
    assert server["cpu_percent"] > 0 and server["workers"]["count"] == configured_workers("digits")
    assert server["frontend"]["peak_rss_mb"] > 50 and server["workers"]["peak_rss_mb"] > 50
    assert summary["torchserve"]["requests"] >= summary["requests"]


@pytest.mark.integration
def test_make_loadtest_grpc_uses_torchserves_proto_and_all_answers_are_right(tmp_path: Path) -> None:
    summary = make_loadtest(tmp_path, "PROTOCOL=grpc")
    assert summary["protocol"] == "grpc" and summary["target"].startswith("grpc:")
    assert summary["requests"] > 20 and summary["success_rate"] == 1.0, summary["failure_reasons"]


@pytest.mark.integration
def test_a_server_with_wrong_labels_gets_no_successes(tmp_path: Path, start_server: StartServer,
                                                      digits_cases) -> None:
    from tsforge.packaging import archive

    build_dir = tmp_path / "build"
    shutil.copytree(BUILD / "digits", build_dir / "digits", ignore=shutil.ignore_patterns("stage", "mar"))
    labels_file = build_dir / "digits" / "index_to_name.json"
    labels = json.loads(labels_file.read_text())
    labels_file.write_text(json.dumps({k: labels[str((int(k) + 1) % len(labels))] for k in labels}))
    store = tmp_path / "store"
    archive.build(archive.plan("digits", build_dir=build_dir, store=store))
    server = start_server(["digits"], store=store)
    result = load(digits_cases, 4, 2.0, url=f"{server.url('inference')}/predictions/digits")
    assert len(result.latency_ms) > 10 and result.failed == len(result.latency_ms)
    assert all(reason.startswith("wrong label") for reason in result.failures)


def test_mislabel_only_touches_every_nth_case(digits_cases) -> None:
    marked = mislabel(digits_cases, 4)
    wrong = [n for n, (a, b) in enumerate(zip(digits_cases, marked, strict=True)) if a.expect != b.expect]
    assert wrong == list(range(0, len(digits_cases), 4))


def test_tuned_setting_is_written_into_a_model_config_keeping_comments(tmp_path: Path) -> None:
    config = tmp_path / "model.yaml"
    shutil.copy(ROOT / "config" / "models" / "digits.yaml", config)
    apply_to_config(config, Setting(workers=2, batch_size=8, max_batch_delay=3, threads=1))
    import yaml

    loaded = yaml.safe_load(config.read_text())
    assert (loaded["minWorkers"], loaded["maxWorkers"], loaded["batchSize"], loaded["maxBatchDelay"]) == (2, 2, 8, 3)
    assert loaded["handler"]["threads"] == 1
    assert "# ms to wait for a batch to fill" in config.read_text()


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_loadgen_gets_only_right_answers_over_rest_and_grpc(digits_server, digits_cases, protocol: str) -> None:
    if protocol == "rest":
        target = {"url": f"{digits_server.url('inference')}/predictions/digits"}
    else:
        target = {"grpc_target": f"127.0.0.1:{digits_server.props['grpc_inference_port']}", "model": "digits"}
    result = load(digits_cases, 4, 2.0, **target)
    assert len(result.latency_ms) > 10 and result.failed == 0, result.failures
