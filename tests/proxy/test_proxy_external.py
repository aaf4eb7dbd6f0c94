"""External services through the outbound listener: TLS origination verified against the
declared CA, refused certificates, retries and timeouts, names resolved off the request path.
Real loopback sockets, real TLS, a test CA of the external server's own."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from external_testing import TLSBackend, server_files, write_ca
from proxy_mesh_testing import Host, make_host
from proxy_testing import Backend, MiniCA, eventually, sample

from meshd.config.routes import parse_routes
from meshd.config.schema import LocalService, Upstream
from meshd.proxy.core.view import ViewCell


@dataclass
class Outside:
    host: Host
    view: ViewCell
    bank: TLSBackend
    bank_ca: Path  # the CA file that verifies the bank
    other_ca: Path  # a CA that does not
    plain: Backend

    def url(self, upstream: str = "bank") -> str:
        host, port = self.host.proxy.outbound_address("web", upstream)
        return f"http://{host}:{port}"

    def route(self, external: dict[str, Any], **extra: Any) -> None:
        self.view.set_routes(parse_routes({"default_policy": "allow", "destinations": {
            "bank": {"external": external, **extra}}}))

    def tls_to_bank(self, **overrides: Any) -> dict[str, Any]:
        return {"addresses": [f"127.0.0.1:{self.bank.port}"], "sni": "bank.test",
                "ca_file": str(self.bank_ca), **overrides}


@pytest.fixture
async def outside(tmp_path: Path, nursery: trio.Nursery) -> Outside:
    bank_ca, other_ca = MiniCA.create("bank test root"), MiniCA.create("another root")
    cert, key = server_files(bank_ca, tmp_path / "bank", "bank.test")
    bank = TLSBackend("bank", "external", cert_file=cert, key_file=key)
    plain = Backend("plain", "external")
    await nursery.start(bank.serve)
    await nursery.start(plain.serve)
    view = ViewCell()
    host = make_host(MiniCA.create(), tmp_path, "a", [LocalService("web", 1, upstreams=(
        Upstream("bank", 0),))], view)
    await nursery.start(host.proxy.run)
    return Outside(host, view, bank, write_ca(bank_ca, tmp_path / "bank-ca.pem"),
                   write_ca(other_ca, tmp_path / "other-ca.pem"), plain)


async def test_tls_origination_verifies_and_names_the_external_host(outside: Outside) -> None:
    outside.route(outside.tls_to_bank())
    async with httpx.AsyncClient(base_url=outside.url()) as client:
        first = await client.post("/charge", content=b"amount=12")
        second = await client.get("/version")
    assert first.status_code == 200 and second.status_code == 200
    seen = first.json()
    assert seen["path"] == "/charge" and seen["size"] == 9
    # the external server sees its own name, not the outbound listener's address
    assert seen["headers"]["host"] == f"bank.test:{outside.bank.port}"
    assert outside.bank.snis == ["bank.test"]  # one pooled TLS connection, SNI sent
    assert outside.bank.connections == 1
    m = outside.host.metrics
    assert sample(m, "meshd_requests_total", direction="outbound", source="web",
                  destination="bank", subset="", code="200") == 2


async def test_a_certificate_from_another_ca_is_refused_with_the_reason(
        outside: Outside, caplog: pytest.LogCaptureFixture) -> None:
    outside.route(outside.tls_to_bank(ca_file=str(outside.other_ca)))
    with caplog.at_level(logging.WARNING, logger="meshd.proxy.external"):
        async with httpx.AsyncClient(base_url=outside.url()) as client:
            response = await client.get("/version")
    assert response.status_code == 503
    assert response.headers["x-meshd-error"] == "upstream-tls-failed"
    reason = response.headers["x-meshd-reason"]
    assert "bank.test" in reason and "certificate verify failed" in reason
    assert outside.bank.requests == 0  # nothing reached the server
    assert any("bank.test" in r.getMessage() and "certificate verify failed" in r.getMessage()
               for r in caplog.records)
    assert sample(outside.host.metrics, "meshd_connection_errors_total", direction="outbound",
                  reason="upstream_tls_failed") >= 1


async def test_a_certificate_for_another_name_is_refused(outside: Outside) -> None:
    outside.route(outside.tls_to_bank(sni="payments.test"))
    async with httpx.AsyncClient(base_url=outside.url()) as client:
        response = await client.get("/version")
    assert response.status_code == 503
    assert response.headers["x-meshd-error"] == "upstream-tls-failed"
    assert "payments.test" in response.headers["x-meshd-reason"]
    assert "mismatch" in response.headers["x-meshd-reason"].lower()
    assert outside.bank.requests == 0


async def test_retries_and_timeouts_apply_to_an_external_destination(outside: Outside) -> None:
    outside.bank.status = 503
    outside.route(outside.tls_to_bank(),
                  retries={"attempts": 2, "retry_on": ["5xx"]})
    async with httpx.AsyncClient(base_url=outside.url()) as client:
        response = await client.get("/version")
        assert response.status_code == 503  # the bank's own answer, after 3 tries
        assert outside.bank.requests == 3
        assert sample(outside.host.metrics, "meshd_retries_total", destination="bank",
                      reason="503") == 2
        outside.bank.status = 200
        outside.route(outside.tls_to_bank(), timeout="300ms")
        response = await client.get("/slow?delay=5")
    assert response.status_code == 504
    assert response.headers["x-meshd-error"] == "timeout"


async def test_plain_external_by_host_name_resolved_off_the_request_path(
        outside: Outside) -> None:
    outside.route({"hosts": ["localhost"], "port": outside.plain.port, "tls": "none"})
    await eventually(lambda: bool(outside.view.current.external.get("bank")
                                  and outside.view.current.external["bank"].endpoints))
    endpoints = outside.view.current.external["bank"].endpoints
    assert {e.node for e in endpoints} == {"localhost"}
    assert "127.0.0.1" in {e.address for e in endpoints}
    async with httpx.AsyncClient(base_url=outside.url()) as client:
        for _ in range(3):  # an address the server does not listen on (::1) is retried
            response = await client.get("/version")
            assert response.status_code == 200
            assert response.json()["headers"]["host"] == f"localhost:{outside.plain.port}"
    assert outside.plain.requests == 3
