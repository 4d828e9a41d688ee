"""The tier check (tests/tiers.py): an unmarked test that starts a server fails, a marked one may."""

from __future__ import annotations

import pytest

from tests import tiers
from tests.conftest import ROOT
from tests.tiers import starts_a_server

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestAssertRewriteWarning")


@pytest.mark.parametrize("argv", [
    ["/venv/bin/torchserve", "--start", "--foreground"], ["java", "-version"], ["/usr/lib/jvm/bin/java"],
    ["python", "-m", "tsforge.serving.front", "--http-port", "1"], ["python", "-m", "tsforge", "serve"],
    ["python", "-m", "tsforge", "pod", "--mount", "x"], ["tsforge", "front"], ["make", "-s", "serve", "MODEL=x"],
    ["make", "-s", "bench", "MODEL=digits"], ["python", "-m", "loadtest.bench"], ["uvicorn", "app:app"],
])
def test_server_commands_are_recognised(argv: list[str]) -> None:
    assert starts_a_server(argv)


@pytest.mark.parametrize("argv", [
    ["make", "-s", "model_store/digits.mar", "MODELS=digits"], ["make", "-s", "kserve"], ["python", "-m", "tsforge",
    "export", "digits"], ["tsforge", "--help"], ["tsforge", "serve", "--help"][:1], ["hadolint", "Dockerfile"],
    ["python", "-c", "print(1)"], ["javac"], ["make", "-n", "test"], ["tsforge", "front", "--help"],
])
def test_other_commands_are_not(argv: list[str]) -> None:
    assert not starts_a_server(argv)


INNER = '''
import subprocess
import pytest

def test_unmarked_direct():
    subprocess.run(["java", "-version"], capture_output=True)

def test_unmarked_in_a_child_process():
    subprocess.run(["sh", "-c", "java -version"], capture_output=True)

@pytest.mark.integration
def test_marked():
    found = subprocess.run(["sh", "-c", "command -v java"], capture_output=True, text=True).stdout
    assert "tsforge-unit-tier" not in found

def test_unmarked_without_a_server():
    subprocess.run(["sh", "-c", "true"], check=True)
'''


def test_an_unmarked_test_that_starts_java_fails(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in tiers.saved_environment().items():  # the inner run starts outside this test's tier
        if value is not None:
            monkeypatch.setenv(key, value)
    pytester.makeconftest('pytest_plugins = ["tests.tiers"]\n'
                          'def pytest_configure(config):\n'
                          '    config.addinivalue_line("markers", "integration: starts a server")\n')
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-o", f"pythonpath={ROOT}")
    text = result.stdout.str()
    failing = {line.split("::")[1].split()[0] for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))}
    assert failing == {"test_unmarked_direct", "test_unmarked_in_a_child_process"}, text
    assert "has no integration mark but started a server: java" in text
