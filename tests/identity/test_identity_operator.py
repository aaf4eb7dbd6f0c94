"""Operator certificates and the admin API over mutual TLS (`[admin] tls = true`)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import trio
from daemon_testing import TD, app, open_mesh, start_daemon, wait_for
from identity_testing import write_identities
from net_testing import free_port

from meshd.ca import operations
from meshd.config.parse import parse_host_config
from meshd.errors import ConfigError
from meshd.identity import files, keys
from meshd.identity.spiffe import Kind, spiffe_ids_from_cert_der

HOST = "127.0.24.2"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def issue(ca_dir: Path, out: Path, kind: Kind, name: str) -> tuple[Path, Path, str]:
    material, key_pem, cert, chain = operations.issue_offline(ca_dir, kind, name,
                                                         now=datetime.now(UTC), who="test")
    out.mkdir(parents=True, exist_ok=True)
    files.write_private_file(out / f"{name}.key", key_pem)
    files.write_public_file(out / f"{name}.crt", chain)
    files.write_public_file(out / "ca.crt", b"".join(keys.cert_pem(r)
                                                     for r in material.roots()))
    return out / f"{name}.crt", out / f"{name}.key", keys.serial_hex(cert)


def client_context(bundle: Path, cert: Path | None = None,
                   key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=bundle)
    context.check_hostname = False  # the admin API presents the node's SPIFFE identity
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


async def test_admin_over_mutual_tls_serves_operators_only(
    nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    mesh = await open_mesh(nursery, tmp_path, http)
    app_port = free_port(HOST)
    await nursery.start(app, HOST, app_port, "payments")
    config = mesh.host_config("host-b", HOST, [
        {"name": "payments", "port": app_port, "address": HOST, "health": {"none": True}}])
    config = mesh.host_config("host-b", HOST, [
        {"name": "payments", "port": app_port, "address": HOST, "health": {"none": True}}],
        admin={"address": f"{HOST}:{config.admin_port}", "tls": True})
    daemon = await start_daemon(nursery, config)
    admin = f"https://{HOST}:{config.admin_port}"
    alice_crt, alice_key, alice_serial = issue(mesh.ca_dir, tmp_path / "ops", Kind.OPERATOR,
                                               "alice")
    bundle = tmp_path / "ops" / "ca.crt"

    async def get(context: ssl.SSLContext, path: str = "/v1/state") -> httpx.Response:
        async with httpx.AsyncClient(verify=context, timeout=10) as client:
            return await client.get(admin + path)

    # an operator: served, by the node's identity
    response = await get(client_context(bundle, alice_crt, alice_key))
    assert response.status_code == 200 and response.json()["node"] == "host-b"
    der = await peer_certificate(HOST, config.admin_port,
                                 client_context(bundle, alice_crt, alice_key))
    assert spiffe_ids_from_cert_der(der) == [f"spiffe://{TD}/node/host-b"]

    # no client certificate: the handshake fails
    with pytest.raises(httpx.HTTPError):
        await get(client_context(bundle))
    # a certificate of another CA: the handshake fails
    other = tmp_path / "other"
    write_identities(other, TD, ["alice"])
    with pytest.raises(httpx.HTTPError):
        await get(client_context(bundle, other / "alice.crt", other / "alice.key"))
    # a service's certificate from the mesh CA: not an operator
    web_crt, web_key, _ = issue(mesh.ca_dir, tmp_path / "svc", Kind.SERVICE, "web")
    response = await get(client_context(bundle, web_crt, web_key))
    assert response.status_code == 403
    assert response.json()["error"] == "not_an_operator"
    assert "refused (not_an_operator)" in caplog.text

    # revoked: refused within seconds (the deny list poll)
    operations.revoke(mesh.ca_dir, now=datetime.now(UTC), serial=alice_serial, who="test")

    async def refused() -> bool:
        return (await get(client_context(bundle, alice_crt, alice_key))).status_code == 403
    await wait_for(refused)
    response = await get(client_context(bundle, alice_crt, alice_key), "/metrics")
    assert response.json()["error"] == "revoked"
    await daemon.stop()


async def peer_certificate(host: str, port: int, context: ssl.SSLContext) -> bytes:
    stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context)
    await stream.do_handshake()
    der: bytes | None = stream.getpeercert(binary_form=True)
    await stream.aclose()
    assert der is not None
    return der


def _config(admin: dict[str, object]) -> None:
    parse_host_config({
        "node": "n", "trust_domain": TD,
        "ca": {"url": "https://ca:1", "fingerprint": "sha256:" + "0" * 64, "token_file": "t"},
        "admin": admin})


def test_admin_beyond_loopback_needs_tls() -> None:
    with pytest.raises(ConfigError, match=r"admin\.address: 0\.0\.0\.0 is not a loopback "
                                          r"address: without TLS"):
        _config({"address": "0.0.0.0:15000"})
    with pytest.raises(ConfigError, match=r"set admin\.tls = true"):
        _config({"address": "10.0.0.5:15000", "tls": False})
    _config({"address": "0.0.0.0:15000", "tls": True})
    _config({"address": "127.0.0.1:15000", "tls": True})
    with pytest.raises(ConfigError, match=r"admin\.tls: expected a boolean"):
        _config({"address": "127.0.0.1:15000", "tls": "yes"})
