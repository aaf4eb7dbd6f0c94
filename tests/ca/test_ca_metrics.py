"""The CA's /metrics over its real HTTPS API: for an operator certificate only, with what joins
and renewals came to, the deny list and the roots' expiry."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from ca_testing import verified_context
from prometheus_client.parser import text_string_to_metric_families
from test_ca_renew import joined, mint, renew

from meshd.ca.operations import issue_to_directory, revoke
from meshd.ca.server import CAEndpoint
from meshd.ca.store import CAMaterial
from meshd.identity import ca_client as client
from meshd.identity.ca_client import CARefusedError
from meshd.identity.spiffe import Kind


def value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def context_with(ca: CAMaterial, cert: Path | None = None,
                 key: Path | None = None) -> ssl.SSLContext:
    context = verified_context(ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


async def scrape(endpoint: CAEndpoint, context: ssl.SSLContext) -> httpx.Response:
    async with httpx.AsyncClient(verify=context, timeout=10) as http:
        return await http.get(f"{endpoint.url}/metrics")


async def test_metrics_for_operators_only(ca: CAMaterial, ca_server: CAEndpoint,
                                          tmp_path: Path) -> None:
    now = datetime.now(UTC)
    alice = issue_to_directory(ca.directory, Kind.OPERATOR, "alice", tmp_path / "alice", now=now)
    bob = issue_to_directory(ca.directory, Kind.OPERATOR, "bob", tmp_path / "bob", now=now)
    web = issue_to_directory(ca.directory, Kind.SERVICE, "web", tmp_path / "web", now=now)

    r = await scrape(ca_server, context_with(ca))
    assert r.status_code == 401 and r.json()["error"] == "certificate_required"
    r = await scrape(ca_server, context_with(ca, web.cert, web.key))
    assert r.status_code == 403 and r.json()["error"] == "not_an_operator"
    assert "meshd_ca" not in r.text
    revoke(ca.directory, now=now, serial=format(bob.certificate.serial_number, "x"))
    r = await scrape(ca_server, context_with(ca, bob.cert, bob.key))
    assert r.status_code == 403 and r.json()["error"] == "revoked"

    r = await scrape(ca_server, context_with(ca, alice.cert, alice.key))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert value(text, "meshd_ca_requests_refused_total", request="metrics",
                 reason="not_an_operator") == 1
    assert value(text, "meshd_ca_denylist_serials") == 1  # bob's
    assert value(text, "meshd_ca_root_expiry_timestamp_seconds", fingerprint=ca.fingerprint,
                 signing="true") == ca.signer.cert.not_valid_after_utc.timestamp()
    assert value(text, "process_open_fds")
    assert "_created" not in text


async def test_metrics_count_issued_renewed_and_refused(
    ca: CAMaterial, ca_server: CAEndpoint, tmp_path: Path
) -> None:
    alice = issue_to_directory(ca.directory, Kind.OPERATOR, "alice", tmp_path / "alice",
                               now=datetime.now(UTC))
    await joined(ca_server, ca, tmp_path / "n1", services=("web", "cart"))
    await renew(ca_server, tmp_path / "n1", services=("web",))
    token = mint(ca, "n2")
    with pytest.raises(CARefusedError) as info:
        await client.join(ca_server.url, token=token + "x", node="n2", services=["web"],
                          fingerprint=ca_server.fingerprint)
    assert info.value.code == "invalid_token"
    text = (await scrape(ca_server, context_with(ca, alice.cert, alice.key))).text
    assert value(text, "meshd_ca_certificates_issued_total", kind="node", request="join") == 1
    assert value(text, "meshd_ca_certificates_issued_total", kind="service",
                 request="join") == 2
    assert value(text, "meshd_ca_certificates_issued_total", kind="node", request="renew") == 1
    assert value(text, "meshd_ca_certificates_issued_total", kind="service",
                 request="renew") == 1
    assert value(text, "meshd_ca_join_tokens_redeemed_total") == 1
    assert value(text, "meshd_ca_requests_refused_total", request="join",
                 reason="invalid_token") == 1
    assert value(text, "meshd_ca_nodes") == 1
