"""Where meshd's registry address and token come from: meshd.toml, then Consul's variables."""

from __future__ import annotations

import pytest

from meshd.config.host import parse_host_config
from meshd.registry.consul import registry_token, registry_url

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
    assert registry_token("") is None


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
