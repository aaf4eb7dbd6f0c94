"""Ingress gateways over real sockets: outside clients (HTTP, HTTPS with SNI, h2, TLS
passthrough) into mesh services over mTLS, with the gateway's own identity."""

from __future__ import annotations

import dataclasses
import json
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from proxy_mesh_testing import Host, make_host
from proxy_testing import TD, Backend, MiniCA, host_config, read_until_eof, sample
from test_proxy_http_limits import SMUGGLING

from meshd.config.gateway import Gateway, GatewayCertificate, GatewayListener, GatewayRoute
from meshd.config.routes import parse_routes
from meshd.config.schema import LocalService, Protocol
from meshd.identity.tls import TLSState
from meshd.metrics import Metrics
from meshd.proxy.core.view import MeshView, ViewCell
from meshd.proxy.forward import HEAD_TIMEOUT
from meshd.proxy.server import Proxy
from meshd.registry.model import Endpoint, EndpointSet


def issue_server(ca: MiniCA, directory: Path, hosts: list[str]) -> tuple[Path, Path]:
    """A TLS server certificate for ``hosts`` (DNS names) signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{hosts[0]}.crt", directory / f"{hosts[0]}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TLSEcho:
    """A TCP app that terminates TLS itself (for passthrough) and echoes lines back."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, self.ctx, server_side=True)
        try:
            data = await stream.receive_some(1024)
            await stream.send_all(b"echo " + data)
            await stream.aclose()
        except trio.BrokenResourceError:
            pass


@dataclass
class Edge:
    outside_ca: MiniCA  # signs the certificates outside clients see
    gateway: Host
    web: Backend
    view: ViewCell
    http: tuple[str, int]
    https: tuple[str, int]
    redirect: tuple[str, int]
    tls: tuple[str, int]

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.outside_ca.pem.decode())
        return ctx


@pytest.fixture
async def edge(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Edge]:
    ca, outside = MiniCA.create(), MiniCA.create("outside root")
    web = Backend("web", "v1")
    await nursery.start(web.serve)
    shop = issue_server(outside, tmp_path / "edge", ["shop.test"])
    api = issue_server(outside, tmp_path / "edge", ["api.test", "*.api.test"])
    vault_cert = issue_server(outside, tmp_path / "vault", ["vault.test"])
    vault_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    vault_ctx.load_cert_chain(*map(str, vault_cert))
    vault = TLSEcho(vault_ctx)
    await nursery.start(vault.serve)

    view = ViewCell(MeshView(routes=parse_routes({"default_policy": "deny", "destinations": {
        "web": {"authorization": {"rules": [
            {"name": "from-the-edge", "action": "allow", "from": ["edge"]}]}},
        "vault": {"authorization": {"rules": [
            {"name": "from-the-edge", "action": "allow", "from": ["edge"]}]}}}}),
        endpoints=MappingProxyType({})))
    b = make_host(ca, tmp_path, "b", [LocalService("web", web.port),
                                      LocalService("vault", vault.port, protocol=Protocol.TCP)],
                  view)
    ports = [free_port() for _ in range(4)]
    gateway = Gateway("edge", (
        GatewayListener(ports[0], "http", "127.0.0.1"),
        GatewayListener(ports[1], "https", "127.0.0.1", (
            GatewayCertificate(*shop, ("shop.test",)),
            GatewayCertificate(*api, ("api.test", "*.api.test")))),
        GatewayListener(ports[2], "http", "127.0.0.1", redirect_https=ports[1]),
        GatewayListener(ports[3], "tls", "127.0.0.1")),
        (GatewayRoute("vault", ("vault.test",)),
         GatewayRoute("web", ("shop.test", "*.api.test", "127.0.0.1"), "/"),))
    cert_dir = tmp_path / "g" / "certs"
    ca.write_identity(cert_dir, "edge")
    config = dataclasses.replace(host_config("g", tmp_path / "g", []), gateways=(gateway,))
    tls = TLSState(cert_dir, TD, config.identities)
    metrics = Metrics()
    g = Host(Proxy(config, view, tls, metrics), metrics, tls, cert_dir)
    for host in (b, g):
        await nursery.start(host.proxy.run)
    for service in ("web", "vault"):
        view.set_endpoints(EndpointSet(service, (
            Endpoint(service, f"{service}-1", "b", "127.0.0.1", b.port, "v1"),), 1, 0.0))
    yield Edge(outside, g, web, view, *(g.proxy.gateway_address("edge", i) for i in range(4)))


async def test_http_into_the_mesh_with_the_gateways_identity(edge: Edge) -> None:
    host, port = edge.http
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{host}:{port}/checkout",
                                    headers={"x-forwarded-proto": "https"})
        assert response.status_code == 200, response.text
        seen = response.json()["headers"]
        assert seen["x-meshd-source"] == "edge"  # the callee's meshd saw the gateway's SPIFFE ID
        assert seen["x-forwarded-proto"] == "http"  # the client's claim was replaced
        assert "127.0.0.1" in seen["x-forwarded-for"]
        # no route for the host: 404 from the gateway, with the reason
        response = await client.get(f"http://{host}:{port}/", headers={"host": "other.test"})
        assert response.status_code == 404
        assert response.headers["x-meshd-error"] == "no-route"
    assert sample(edge.gateway.metrics, "meshd_requests_total", direction="outbound",
                  source="edge", destination="web", subset="", code="200") == 1


async def test_https_terminated_with_the_certificate_sni_picks(edge: Edge) -> None:
    host, port = edge.https
    for name in ("shop.test", "v2.api.test"):
        transport = httpx.AsyncHTTPTransport(verify=edge.client_context(), http2=False)
        async with httpx.AsyncClient(transport=transport) as client:
            # the client resolves the name to the gateway: SNI and Host say the name
            response = await client.get(f"https://{host}:{port}/pay",
                                        extensions={"sni_hostname": name},
                                        headers={"host": f"{name}:{port}"})
        assert response.status_code == 200, (name, response.text)
        assert response.json()["headers"]["x-forwarded-proto"] == "https"


async def test_h2_over_https_and_the_redirect_to_https(edge: Edge) -> None:
    host, port = edge.https
    ca_path = trio.Path(edge.gateway.cert_dir.parent / "outside.pem")
    await ca_path.write_bytes(edge.outside_ca.pem)
    done = await trio.run_process(
        ["curl", "-sS", "--max-time", "10", "--http2", "--cacert", str(ca_path), "--resolve",
         f"shop.test:{port}:{host}", "-w", "\n%{http_version}", f"https://shop.test:{port}/x"],
        capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr
    body, version = done.stdout.rsplit(b"\n", 1)
    assert version == b"2"
    assert json.loads(body)["headers"]["x-meshd-source"] == "edge"
    rhost, rport = edge.redirect
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{rhost}:{rport}/a/b?c=1",
                                    headers={"host": "shop.test"})
    assert response.status_code == 308
    assert response.headers["location"] == f"https://shop.test:{port}/a/b?c=1"


async def test_tls_passthrough_by_sni_to_a_tcp_service(edge: Edge) -> None:
    host, port = edge.tls

    def talk() -> bytes:
        import socket
        ctx = edge.client_context()
        with socket.create_connection((host, port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="vault.test") as tls:
            tls.sendall(b"secret")
            return tls.recv(1024)

    # the app's own certificate (vault.test) reached the client: TLS was not terminated here
    assert await trio.to_thread.run_sync(talk) == b"echo secret"


async def test_the_callee_authorization_refuses_callers_other_than_the_gateway(
        edge: Edge) -> None:
    edge.view.set_routes(parse_routes({"default_policy": "deny", "destinations": {
        "web": {"authorization": {"rules": [
            {"name": "web-only", "action": "allow", "from": ["web"]}]}}}}))
    host, port = edge.http
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{host}:{port}/checkout")
    assert response.status_code == 403


def _unused(_: subprocess.CompletedProcess[bytes]) -> None:
    """(keeps the subprocess import for run_process's type)"""


def test_explain_picks_the_service_a_gateway_routes_to() -> None:
    from meshd.cli.explain import gateway_route
    from meshd.proxy.core.matcher import RequestFacts

    state = {"gateways": [{"name": "edge", "routes": [
        {"hosts": ["api.test"], "path_prefix": "/v2", "service": "api-v2"},
        {"hosts": ["*"], "path_prefix": "/", "service": "web"}]}]}
    facts = RequestFacts("GET", "/v2/x", [("Host", "API.test:8443")])
    assert gateway_route(state, "edge", facts)[0] == "api-v2"
    assert gateway_route(state, "edge", RequestFacts("GET", "/", [("host", "a")]))[0] == "web"
    assert "no gateway 'side'" in gateway_route(state, "side", facts)
    state["gateways"][0]["routes"].pop()
    assert "answers 404" in gateway_route(state, "edge", RequestFacts("GET", "/", []))


# -- hostile HTTP at the outside listeners: the outbound listener's answers --------------------

async def _raw(edge: Edge, data: bytes, *, tls: bool = False) -> bytes:
    host, port = edge.https if tls else edge.http
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if tls:
        ctx = edge.client_context()
        ctx.set_alpn_protocols(["http/1.1"])
        stream = trio.SSLStream(stream, ctx, server_hostname="shop.test")
    await stream.send_all(data)
    return await read_until_eof(stream)


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("case", list(SMUGGLING))
async def test_smuggling_at_the_gateway_is_refused_with_400(edge: Edge, case: str,
                                                            tls: bool) -> None:
    answer = await _raw(edge, SMUGGLING[case].replace(b"Host: a", b"Host: shop.test"), tls=tls)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert answer.count(b"HTTP/1.1 ") == 1  # nothing smuggled got its own answer
    assert all(s["path"] != "/admin" for s in edge.web.seen)


async def test_header_limits_and_slow_heads_at_the_gateway(edge: Edge) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    answer = await _raw(edge, b"GET / HTTP/1.1\r\nHost: shop.test\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    big = b"X-Big: " + b"a" * 70_000 + b"\r\n"
    answer = await _raw(edge, b"GET / HTTP/1.1\r\nHost: shop.test\r\n" + big + b"\r\n",
                        tls=True)
    assert answer.startswith(b"HTTP/1.1 431 ")
    # slowloris: a head trickling in byte by byte is answered 408 HEAD_TIMEOUT after its start
    host, port = edge.http
    stream = await trio.open_tcp_stream(host, port)
    started = trio.current_time()
    with trio.fail_after(HEAD_TIMEOUT + 5):
        async with trio.open_nursery() as nursery:
            async def trickle() -> None:
                for byte in b"GET / HTTP/1.1\r\nHost: shop.test\r\nX-Slow: " + b"a" * 100:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.5)
            nursery.start_soon(trickle)
            answer = await read_until_eof(stream, HEAD_TIMEOUT + 4)
            nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert HEAD_TIMEOUT - 1 <= trio.current_time() - started <= HEAD_TIMEOUT + 2
