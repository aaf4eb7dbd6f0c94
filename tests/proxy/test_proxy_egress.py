"""The egress proxy listener (``[outbound] egress_port``): declared external services through
it (http:// with TLS originated by meshd, CONNECT tunnels), undeclared hosts refused under
``egress = "registered-only"`` and passed through under ``"allow-any"``. Real loopback
sockets, real TLS, httpx as the app (it speaks to proxies as curl and requests do)."""

from __future__ import annotations

import dataclasses
import random
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from external_testing import TLSBackend, server_files, write_ca
from proxy_testing import Backend, MiniCA, host_config, read_until_eof, sample

from meshd.config.routes import parse_routes
from meshd.config.schema import LocalService
from meshd.identity.tls import TLSState
from meshd.metrics import Metrics
from meshd.proxy.core.view import ViewCell
from meshd.proxy.server import Proxy


@dataclass
class Edge:
    proxy: Proxy
    metrics: Metrics
    view: ViewCell
    bank: TLSBackend
    bank_context: ssl.SSLContext  # what an app trusts the bank with
    plain: Backend

    @property
    def proxy_url(self) -> str:
        host, port = self.proxy.egress_address
        return f"http://{host}:{port}"

    def routes(self, egress: str = "registered-only", **bank: Any) -> None:
        external = {"addresses": [f"127.0.0.1:{self.bank.port}"], "sni": "bank.test",
                    "ca_file": str(self.bank_ca), **bank}
        self.view.set_routes(parse_routes({"egress": egress, "destinations": {
            "bank": {"external": external}}}))

    bank_ca: Path = Path()

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(proxy=self.proxy_url, verify=self.bank_context, timeout=10)

    async def connect(self, target: str) -> tuple[bytes, trio.SocketStream]:
        """A raw CONNECT: the proxy's answer head, and the stream to go on with."""
        host, port = self.proxy.egress_address
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(4096)
                if not data:
                    break
                head += data
        return head, stream


@pytest.fixture
async def edge(tmp_path: Path, nursery: trio.Nursery) -> Edge:
    bank_ca = MiniCA.create("bank test root")
    cert, key = server_files(bank_ca, tmp_path / "bank", "bank.test")
    bank = TLSBackend("bank", "external", cert_file=cert, key_file=key)
    plain = Backend("plain", "v1")
    await nursery.start(bank.serve)
    await nursery.start(plain.serve)
    mesh_ca = MiniCA.create()
    mesh_ca.write_identity(tmp_path / "certs", "web")
    config = dataclasses.replace(
        host_config("a", tmp_path, [LocalService("web", 1)]), egress_port=0)
    view, metrics = ViewCell(), Metrics()
    proxy = Proxy(config, view, TLSState(tmp_path / "certs", "mesh.test", ["web"]), metrics,
                  rand=random.Random(1).random)
    await nursery.start(proxy.run)
    ca_file = write_ca(bank_ca, tmp_path / "bank-ca.pem")
    edge = Edge(proxy, metrics, view, bank, ssl.create_default_context(cafile=str(ca_file)),
                plain, ca_file)
    edge.routes()
    return edge


async def test_registered_only_refuses_an_undeclared_host_and_its_connect(edge: Edge) -> None:
    async with edge.client() as client:
        response = await client.get(f"http://127.0.0.1:{edge.plain.port}/version")
    assert response.status_code == 403
    assert response.headers["x-meshd-error"] == "egress-denied"
    reason = response.headers["x-meshd-reason"]
    assert f"127.0.0.1:{edge.plain.port}" in reason and "registered-only" in reason
    head, stream = await edge.connect(f"127.0.0.1:{edge.plain.port}")
    async with stream:
        assert head.startswith(b"HTTP/1.1 403 ")
        assert b"x-meshd-error: egress-denied" in head
        rest = await read_until_eof(stream)  # then closed: no tunnel
        assert b"registered-only" in head + rest
    assert edge.plain.connections == 0  # neither reached it
    for kind in ("http", "connect"):
        assert sample(edge.metrics, "meshd_egress_requests_total", kind=kind,
                      verdict="denied", destination="") == 1


async def test_allow_any_passes_undeclared_hosts_through_and_counts_them(edge: Edge) -> None:
    edge.routes(egress="allow-any")
    async with edge.client() as client:
        response = await client.get(f"http://127.0.0.1:{edge.plain.port}/version?x=1")
    assert response.status_code == 200
    assert edge.plain.seen[-1]["path"] == "/version"
    assert edge.plain.last_headers["host"] == f"127.0.0.1:{edge.plain.port}"
    # CONNECT to an undeclared port of 127.0.0.1: a tunnel, the app's own TLS inside it
    head, stream = await edge.connect(f"127.0.0.1:{edge.bank.port}")
    assert head.startswith(b"HTTP/1.1 200 ")
    tls = trio.SSLStream(stream, edge.bank_context, server_hostname="bank.test")
    async with tls:
        await tls.send_all(b"GET /version HTTP/1.1\r\nHost: bank.test\r\nConnection: close"
                           b"\r\n\r\n")
        answer = await read_until_eof(tls)
    assert answer.startswith(b"HTTP/1.1 200 ")
    for kind in ("http", "connect"):
        assert sample(edge.metrics, "meshd_egress_requests_total", kind=kind,
                      verdict="passthrough", destination="") == 1
    assert sample(edge.metrics, "meshd_tcp_connections_opened_total", direction="egress",
                  source="egress", destination="passthrough", subset="") == 1


async def test_a_declared_external_host_through_the_proxy(edge: Edge) -> None:
    async with edge.client() as client:
        # plain http:// from the app: meshd originates TLS, verified against the bank's CA
        response = await client.post("http://bank.test/charge", content=b"12")
        assert response.status_code == 200
        assert response.json()["path"] == "/charge"
        assert response.json()["headers"]["host"] == f"bank.test:{edge.bank.port}"
        # https:// from the app: a CONNECT to the declared host:port, the app's TLS inside
        response = await client.get(f"https://bank.test:{edge.bank.port}/version")
        assert response.status_code == 200
        # another port of a declared host is not declared
        with pytest.raises(httpx.ProxyError):
            await client.get("https://bank.test:8443/version")
    assert edge.bank.snis == ["bank.test", "bank.test"]
    m = edge.metrics
    assert sample(m, "meshd_egress_requests_total", kind="http", verdict="external",
                  destination="bank") == 1
    assert sample(m, "meshd_egress_requests_total", kind="connect", verdict="external",
                  destination="bank") == 1
    assert sample(m, "meshd_egress_requests_total", kind="connect", verdict="denied",
                  destination="bank") == 1
    assert sample(m, "meshd_requests_total", direction="outbound", source="egress",
                  destination="bank", subset="", code="200") == 1


async def test_plain_http_to_a_declared_host_with_a_wrong_certificate_is_refused(
        edge: Edge, tmp_path: Path) -> None:
    edge.routes(ca_file=str(write_ca(MiniCA.create("other"), tmp_path / "other.pem")))
    async with edge.client() as client:
        response = await client.get("http://bank.test/version")
    assert response.status_code == 503
    assert response.headers["x-meshd-error"] == "upstream-tls-failed"
    assert edge.bank.requests == 0


async def test_malformed_and_oversized_connect_heads_are_refused(edge: Edge) -> None:
    edge.routes(egress="allow-any")
    host, port = edge.proxy.egress_address
    for head, status in ((b"CONNECT nowhere HTTP/1.1\r\n\r\n", b"400"),
                         (b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nx: " + b"y" * 9000 + b"\r\n\r\n",
                          b"431")):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(head)
            answer = await read_until_eof(stream)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
    # an origin-form request names no destination; a smuggling-prone one is refused as on the
    # outbound listener
    async with httpx.AsyncClient(base_url=edge.proxy_url) as client:
        response = await client.get("/version")
        assert response.status_code == 400
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(b"POST http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        answer = await read_until_eof(stream)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    assert edge.plain.connections == 0 and edge.bank.connections == 0
