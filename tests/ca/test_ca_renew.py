"""Join -> node certificate -> renewal with it over mutual TLS, against the real CA API."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from ca_testing import TRUST_DOMAIN, verified_context
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshd.ca import audit
from meshd.ca.server import CAEndpoint, serve_ca
from meshd.ca.store import CADatabase, CAMaterial, TokenStore
from meshd.errors import CAError
from meshd.identity import ca_client as client
from meshd.identity import files, keys
from meshd.identity.ca_client import CAConnection, CARefusedError
from meshd.identity.certs import JoinResult
from meshd.identity.spiffe import Kind


def mint(ca: CAMaterial, node: str = "n1", services: tuple[str, ...] = ("web", "cart"),
         ttl: timedelta = timedelta(hours=1), **kwargs: object) -> str:
    token, _ = TokenStore(ca.directory).mint(node, services, now=datetime.now(UTC), ttl=ttl,
                                             **kwargs)  # type: ignore[arg-type]
    return token


async def joined(endpoint: CAEndpoint, ca: CAMaterial, directory: Path, node: str = "n1",
                 services: tuple[str, ...] = ("web",)) -> JoinResult:
    result = await client.join(endpoint.url, token=mint(ca, node), node=node, services=services,
                               fingerprint=endpoint.fingerprint)
    store_result(directory, result)
    return result


def store_result(directory: Path, result: JoinResult) -> None:
    files.write_bundle(directory, result.bundle)
    for identity in result.identities.values():
        files.write_identity(directory, identity)
    files.write_node_identity(directory, result.node)


def connection(endpoint: CAEndpoint, directory: Path, with_node: bool = True) -> CAConnection:
    return CAConnection(endpoint.url, TRUST_DOMAIN, directory / files.BUNDLE_FILE,
                        files.node_files(directory) if with_node else None)


async def renew(endpoint: CAEndpoint, directory: Path, services: tuple[str, ...] = ("web",),
                node: str = "n1") -> JoinResult:
    conn = connection(endpoint, directory)
    try:
        return await conn.renew(node, services)
    finally:
        await conn.aclose()


async def test_join_issues_a_node_certificate_and_records_the_node(
    ca: CAMaterial, ca_server: CAEndpoint, tmp_path: Path
) -> None:
    result = await joined(ca_server, ca, tmp_path, services=("web",))
    node = result.node
    assert node.spiffe_id == "spiffe://mesh.test/node/n1" and node.kind is Kind.NODE
    cert = node.certificate()
    cert.verify_directly_issued_by(ca.signer.cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    state = CADatabase(ca.directory).ledger()
    # the node may claim every service of its token, not only those it asked for this time
    assert state.nodes["n1"].services == ("web", "cart")
    assert {r.kind for r in state.issued.values()} == {Kind.NODE, Kind.SERVICE}
    assert files.read_node_identity(tmp_path) == node
    assert (tmp_path / "_node.key").stat().st_mode & 0o077 == 0


async def test_tokens_are_single_use_by_default(ca: CAMaterial, ca_server: CAEndpoint) -> None:
    token = mint(ca)
    await client.join(ca_server.url, token=token, node="n1", services=["web"],
                      fingerprint=ca_server.fingerprint)
    with pytest.raises(CARefusedError) as info:
        await client.join(ca_server.url, token=token, node="n1", services=["web"],
                          fingerprint=ca_server.fingerprint)
    assert info.value.code == "token_used_up"
    # --uses still allows more
    shared = mint(ca, uses=2)
    for _ in range(2):
        await client.join(ca_server.url, token=shared, node="n1", services=["web"],
                          fingerprint=ca_server.fingerprint)


async def test_renewal_with_the_node_certificate(
    ca: CAMaterial, ca_server: CAEndpoint, tmp_path: Path
) -> None:
    first = await joined(ca_server, ca, tmp_path, services=("web",))
    second = await renew(ca_server, tmp_path, services=("web", "cart"))
    assert second.node.serial != first.node.serial
    assert second.identities["web"].serial != first.identities["web"].serial
    assert second.identities["cart"].spiffe_id == "spiffe://mesh.test/svc/cart"
    # new keys each time, generated here
    assert second.identities["web"].key_pem != first.identities["web"].key_pem
    state = CADatabase(ca.directory).ledger()
    assert state.nodes["n1"].batch == 2 and state.nodes["n1"].confirmed_batch == 1
    # and again with the renewed node certificate
    store_result(tmp_path, second)
    third = await renew(ca_server, tmp_path)
    assert third.node.serial not in (first.node.serial, second.node.serial)


async def test_renewal_needs_no_token_even_after_it_expired(
    ca: CAMaterial, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A host rebooting a day later: its token is long expired, its node certificate is not."""
    clock = [datetime.now(UTC)]
    endpoint: CAEndpoint = await nursery.start(
        partial(serve_ca, ca.directory, "127.0.0.1", 0, clock=lambda: clock[0]))
    token = mint(ca, ttl=timedelta(minutes=10))
    result = await client.join(endpoint.url, token=token, node="n1", services=["web"],
                               fingerprint=endpoint.fingerprint)
    store_result(tmp_path, result)
    clock[0] += timedelta(hours=2)
    with pytest.raises(CARefusedError, match="expired"):
        await client.join(endpoint.url, token=token, node="n1", services=["web"],
                          fingerprint=endpoint.fingerprint)
    renewed = await renew(endpoint, tmp_path)
    assert renewed.identities["web"].not_after > result.identities["web"].not_after


async def _post_renew(endpoint: CAEndpoint, ca: CAMaterial, cert: Path | None, key: Path | None,
                      body: Mapping[str, object]) -> httpx.Response:
    context = verified_context(ca)
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    async with httpx.AsyncClient(verify=context, timeout=10) as http:
        return await http.post(f"{endpoint.url}/v1/ca/renew", json=body)


async def test_renewal_refusals(ca: CAMaterial, ca_server: CAEndpoint, tmp_path: Path,
                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await joined(ca_server, ca, tmp_path, services=("web",))
    body = {"node_csr": "x", "csrs": {"web": "x"}}

    response = await _post_renew(ca_server, ca, None, None, body)
    assert response.status_code == 401
    assert response.json()["error"] == "no_client_certificate"
    assert "node certificate" in response.json()["reason"]

    # a service certificate is not a node certificate
    response = await _post_renew(ca_server, ca, tmp_path / "web.crt", tmp_path / "web.key", body)
    assert (response.status_code, response.json()["error"]) == (403, "not_a_node_certificate")

    cert, key = files.node_files(tmp_path)
    response = await _post_renew(ca_server, ca, cert, key, {**body, "token": "abc"})
    assert (response.status_code, response.json()["error"]) == (400, "bad_request")
    response = await _post_renew(ca_server, ca, cert, key, {"node_csr": "x", "csrs": {"w": 1}})
    assert response.status_code == 400

    with pytest.raises(CARefusedError) as info:
        await renew(ca_server, tmp_path, services=("web", "billing"))
    assert (info.value.status, info.value.code) == (403, "service_not_allowed")
    assert "'billing'" in info.value.reason

    # request size limit: a JSON refusal, before anything is parsed
    response = await _post_renew(ca_server, ca, cert, key, {"csrs": {"web": "x" * 100_000}})
    assert (response.status_code, response.json()["error"]) == (413, "body_too_large")

    with pytest.raises(CAError, match="needs the node certificate"):
        await connection(ca_server, tmp_path, with_node=False).renew("n1", ["web"])

    assert "renewal refused" in caplog.text and "not_a_node_certificate" in caplog.text
    refusals = [r for r in audit.read(ca.directory) if r["action"] == "refuse"]
    assert {r["code"] for r in refusals} >= {"no_client_certificate", "not_a_node_certificate",
                                             "service_not_allowed", "bad_request"}


async def test_state_survives_a_restart_of_the_ca(
    ca: CAMaterial, tmp_path: Path, nursery: trio.Nursery
) -> None:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            first: CAEndpoint = await inner.start(partial(serve_ca, ca.directory, "127.0.0.1", 0))
            await joined(first, ca, tmp_path)
            scope.cancel()
    second: CAEndpoint = await nursery.start(partial(serve_ca, ca.directory, "127.0.0.1", 0))
    renewed = await renew(second, tmp_path)
    assert renewed.node.spiffe_id.endswith("/node/n1")


async def test_every_issuance_is_audited_without_secrets(
    ca: CAMaterial, ca_server: CAEndpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = mint(ca)
    result = await client.join(ca_server.url, token=token, node="n1", services=["web"],
                               fingerprint=ca_server.fingerprint)
    store_result(tmp_path, result)
    renewed = await renew(ca_server, tmp_path)
    records = audit.read(ca.directory)
    issued = [r for r in records if r["action"] == "issue"]
    assert [r["what"] for r in issued] == ["spiffe://mesh.test/node/n1",
                                           "spiffe://mesh.test/svc/web"] * 2
    assert issued[0]["serial"] == result.node.serial
    assert issued[-1]["serial"] == renewed.identities["web"].serial
    assert all({"time", "who", "not_after", "root"} <= r.keys() for r in issued)
    assert "token " + token.split(".")[0] in issued[0]["who"]
    assert "node/n1@127.0.0.1" in issued[2]["who"]
    raw = (ca.directory / audit.AUDIT_FILE).read_text()
    secret = token.split(".")[1]
    for text in (raw, caplog.text, (ca.directory / "state.json").read_text()):
        assert secret not in text and "PRIVATE KEY" not in text
    assert (ca.directory / audit.AUDIT_FILE).stat().st_mode & 0o777 == 0o600
    assert json.loads(raw.splitlines()[0])["action"] == "init"
    assert keys.fingerprint(ca.signer.cert) == issued[0]["root"]
