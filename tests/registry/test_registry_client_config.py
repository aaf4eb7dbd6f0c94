"""Where meshd's registry address and token come from: meshd.toml, then Consul's variables; for
the operator's commands, then the operator context of a running ``meshd up``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshd.config.host import parse_host_config
from meshd.errors import ConfigError
from meshd.operator_context import OperatorContext, write_context
from meshd.registry.consul import operator_token, registry_token, registry_url

HOST = {
    "node": "host-a", "trust_domain": "shop.mesh",
    "ca": {"url": "https://127.0.0.1:8443", "fingerprint": "sha256:" + "ab" * 32,
           "token_file": "join-token"},
}


def test_registry_token_from_meshd_toml_then_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_host_config({**HOST, "registry_token": "from-file"})
    assert config.registry_token == "from-file"
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    assert registry_token(config.registry_token) == "from-file"
    assert registry_token(parse_host_config(HOST).registry_token) == "from-env"
    monkeypatch.delenv("CONSUL_HTTP_TOKEN")
    monkeypatch.delenv("CONSUL_HTTP_TOKEN_FILE", raising=False)
    assert registry_token("") is None


def test_consul_http_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    (tmp_path / "token").write_text("from-token-file\n")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN_FILE", str(tmp_path / "token"))
    assert registry_token(None) == "from-token-file"
    assert registry_token("configured") == "configured"
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    assert registry_token(None) == "from-env"
    monkeypatch.delenv("CONSUL_HTTP_TOKEN")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"CONSUL_HTTP_TOKEN_FILE: cannot read .*missing"):
        registry_token(None)


@pytest.fixture
def context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OperatorContext:
    """A running meshd up's context (this process stands in for it) in a private runtime dir."""
    for name in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "runtime"))
    (tmp_path / "operator-token").write_text("from-context\n")
    ctx = OperatorContext(registry="http://127.0.0.1:8500",
                          token_file=tmp_path / "operator-token", admin=("127.0.0.2:15000",),
                          operator=None, run_dir=tmp_path, pid=os.getpid())
    write_context(ctx)
    return ctx


def test_operator_commands_fall_back_to_the_context_of_its_registry(
        context: OperatorContext, monkeypatch: pytest.MonkeyPatch) -> None:
    assert operator_token(None, "http://127.0.0.1:8500") == "from-context"
    assert operator_token(None, "127.0.0.1:8500") == "from-context"
    assert operator_token(None, "consul://127.0.0.1:8500/") == "from-context"
    assert operator_token(None, "http://127.0.0.1:18500") is None   # another registry
    assert operator_token(None, "http://10.0.0.9:8500") is None
    assert operator_token("given", "http://127.0.0.1:8500") == "given"
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    assert operator_token(None, "http://127.0.0.1:8500") == "from-env"


def test_the_daemon_never_reads_the_context(context: OperatorContext) -> None:
    # the daemon's resolution: meshd.toml, then Consul's variables, and nothing else
    assert registry_token(parse_host_config(HOST).registry_token) is None


@pytest.mark.parametrize(("given", "env", "url"), [
    (None, None, "http://127.0.0.1:8500"),
    (None, "10.0.0.4:8500", "http://10.0.0.4:8500"),
    ("consul://127.0.0.1:18500", "10.0.0.4:8500", "http://127.0.0.1:18500"),
    ("https://consul.internal:8501/", None, "https://consul.internal:8501"),
])
def test_registry_url(given: str | None, env: str | None, url: str,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    if env is None:
        monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    else:
        monkeypatch.setenv("CONSUL_HTTP_ADDR", env)
    assert registry_url(given) == url
