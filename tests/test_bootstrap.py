"""tsforge/bootstrap.py: pip's configuration handed to uv, and pip whenever a setting has no uv twin."""

from __future__ import annotations

from tsforge import bootstrap


def test_pip_locations_become_uv_flags_and_the_certificate_an_environment_variable() -> None:
    env: dict[str, str] = {}
    options = bootstrap.uv_options({"find-links": "/a /b", "extra-index-url": "file:///c", "constraint": "/d.txt",
                                    "cert": "/e.pem", "disable-pip-version-check": "1", "no-index": "true"}, env)
    assert options == ["--find-links", "/a", "--find-links", "/b", "--extra-index-url", "file:///c",
                       "--constraint", "/d.txt", "--no-index"]
    assert env == {"SSL_CERT_FILE": "/e.pem"}


def test_a_setting_uv_cannot_mirror_sends_the_install_to_pip() -> None:
    assert bootstrap.uv_options({"find-links": "/a", "trusted-host": "example"}, {}) is None


def test_only_pip_install_is_accepted() -> None:
    assert bootstrap.main(["install", "torch"]) == 2
