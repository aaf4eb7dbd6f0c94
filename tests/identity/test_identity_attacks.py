"""The identity-attack table: every way a peer can try to pass for someone it is not, each refused
at the right place with its reason logged.

    where     attack                                  refused as
    inbound   no client certificate                   no_client_cert
    inbound   certificate from another CA             untrusted_chain
    inbound   expired certificate                     expired
    inbound   certificate not yet valid               not_yet_valid
    inbound   revoked certificate                     revoked
    inbound   another trust domain                    foreign_trust_domain
    outbound  server with another service's ID        wrong_identity
    CA renew  no client certificate                   no_client_certificate
    CA renew  a service's certificate, not a node's   not_a_node_certificate
    CA renew  claiming another service                service_not_allowed
    CA join   token reused                            token_used_up
    CA join   token for another service               service_not_allowed
    CA join   token expired                           token_expired
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from types import MappingProxyType

import httpx
import pytest
import trio
from identity_testing import TD, ScratchCA

from meshd.ca.server import CAEndpoint, serve_ca
from meshd.ca.store import TokenStore, init_ca
from meshd.config.schema import (
    CASettings,
    DefaultPolicy,
    DestinationRoutes,
    HostConfig,
    LocalService,
    RouteTable,
    Upstream,
)
from meshd.identity import ca_client as client
from meshd.identity import files
from meshd.identity.ca_client import CAConnection, CARefusedError
from meshd.identity.tls import TLSState
from meshd.metrics import Metrics
from meshd.proxy.core.view import MeshView, ViewCell
from meshd.proxy.server import Proxy
from meshd.registry.model import Endpoint, EndpointSet

NOW = datetime.now(UTC)


@dataclass
class Host:
    ca: ScratchCA
    tls: TLSState
    proxy: Proxy
    metrics: Metrics
    view: ViewCell
    certs: Path


@pytest.fixture
async def host(tmp_path: Path, nursery: trio.Nursery) -> Host:
    """One meshd data plane: inbound for ``payments`` (an app that answers), outbound for
    ``web`` -> ``payments``."""
    async def app(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.aclose()

    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, app, [listener])
    ca = ScratchCA()
    certs = tmp_path / "certs"
    for name in ("payments", "web"):
        ca.write(certs, name)
    tls = TLSState(certs, TD, ["payments", "web"])
    config = HostConfig(
        node="b", address="127.0.0.1", trust_domain=TD, registry_url="http://127.0.0.1:1",
        ca=CASettings("https://127.0.0.1:1", "sha256:" + "0" * 64, tmp_path / "token"),
        inbound_port=0, state_dir=tmp_path, services=(
            LocalService("payments", listener.socket.getsockname()[1]),
            LocalService("web", 1, upstreams=(Upstream("payments", 0),))))
    view = ViewCell(MeshView(endpoints=MappingProxyType({}),
                             routes=RouteTable((DestinationRoutes("payments"),),
                                               DefaultPolicy.ALLOW)))
    metrics = Metrics()
    proxy = Proxy(config, view, tls, metrics)
    await nursery.start(proxy.run)
    return Host(ca, tls, proxy, metrics, view, certs)


def refusals(metrics: Metrics, direction: str, reason: str) -> float:
    labels = {"direction": direction, "reason": reason}
    return metrics.registry.get_sample_value("meshd_connection_errors_total", labels) or 0.0


async def attempt_inbound(host: Host, context: ssl.SSLContext) -> None:
    """Connect to the inbound listener as a client would; the refusal shows up at the latest on
    the first read (TLS 1.3 clients finish their side before the server decides)."""
    transport = await trio.open_tcp_stream(*host.proxy.inbound_address)
    stream = trio.SSLStream(transport, context, server_hostname="payments")
    with trio.fail_after(5):
        try:
            await stream.do_handshake()
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n")
            assert await stream.receive_some() == b"", "the request was served"
        except trio.BrokenResourceError:
            pass
    await trio.aclose_forcefully(stream)


def client_context(host: Host, directory: Path | None, name: str = "web") -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=host.certs / files.BUNDLE_FILE)
    if directory is not None:
        context.load_cert_chain(directory / f"{name}.crt", directory / f"{name}.key")
    return context


def prepare_no_client_cert(host: Host, tmp: Path) -> Path | None:
    return None


def prepare_other_ca(host: Host, tmp: Path) -> Path | None:
    ScratchCA().write(tmp, "web")
    return tmp


def prepare_expired(host: Host, tmp: Path) -> Path | None:
    host.ca.write(tmp, "web", now=NOW - timedelta(hours=2), lifetime=timedelta(hours=1))
    return tmp


def prepare_not_yet_valid(host: Host, tmp: Path) -> Path | None:
    host.ca.write(tmp, "web", now=NOW + timedelta(hours=1))
    return tmp


def prepare_revoked(host: Host, tmp: Path) -> Path | None:
    identity = host.ca.write(tmp, "web")
    host.tls.set_denylist([identity.serial])
    return tmp


def prepare_other_trust_domain(host: Host, tmp: Path) -> Path | None:
    host.ca.write(tmp, "web", trust_domain="elsewhere.test")
    return tmp


INBOUND = {
    "no_client_cert": prepare_no_client_cert,
    "untrusted_chain": prepare_other_ca,
    "expired": prepare_expired,
    "not_yet_valid": prepare_not_yet_valid,
    "revoked": prepare_revoked,
    "foreign_trust_domain": prepare_other_trust_domain,
}


@pytest.mark.parametrize("reason", list(INBOUND))
async def test_inbound_attacks(host: Host, tmp_path: Path, reason: str,
                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    directory = INBOUND[reason](host, tmp_path / "attacker")
    await attempt_inbound(host, client_context(host, directory))
    assert refusals(host.metrics, "inbound", reason) == 1
    line = next(r.getMessage() for r in caplog.records if f"refused ({reason})" in r.getMessage())
    assert line.startswith("inbound connection from 127.0.0.1 refused")
    # and the same listener still serves a legitimate caller
    await legitimate_call(host)


async def legitimate_call(host: Host) -> None:
    transport = await trio.open_tcp_stream(*host.proxy.inbound_address)
    stream = trio.SSLStream(transport, client_context(host, host.certs),
                            server_hostname="payments")
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n")
    answer = b""
    with trio.fail_after(5):
        while True:
            try:
                data = await stream.receive_some()
            except trio.BrokenResourceError:
                break
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 200"), answer


async def test_outbound_refuses_a_server_with_another_services_identity(
    host: Host, tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    impostor = tmp_path / "impostor"
    host.ca.write(impostor, "evil")  # a perfectly valid certificate of the mesh CA
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(impostor / "evil.crt", impostor / "evil.key")

    async def serve(transport: trio.SocketStream) -> None:
        stream = trio.SSLStream(transport, server_ctx, server_side=True)
        try:
            await stream.do_handshake()
            await stream.receive_some()
        except trio.BrokenResourceError:
            pass
        await trio.aclose_forcefully(stream)

    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, serve, [listener])
    port = listener.socket.getsockname()[1]
    host.view.set_endpoints(EndpointSet("payments", (
        Endpoint("payments", "payments-v1", "x", "127.0.0.1", port, "v1"),), 1, 0.0))
    out_host, out_port = host.proxy.outbound_address("web", "payments")
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://{out_host}:{out_port}/")
    assert response.status_code == 503  # never reached an app
    assert response.headers["x-meshd-error"] == "wrong-identity"
    assert refusals(host.metrics, "outbound", "wrong_identity") == 1
    assert f"upstream presented spiffe://{TD}/svc/evil, expected spiffe://{TD}/svc/payments" \
        in caplog.text


# -- the CA ---------------------------------------------------------------------------------------

@dataclass
class CA:
    endpoint: CAEndpoint
    directory: Path
    clock: list[datetime]

    def mint(self, services: tuple[str, ...] = ("web",), ttl: timedelta = timedelta(hours=1),
             node: str = "n1") -> str:
        token, _ = TokenStore(self.directory).mint(node, services, now=self.clock[0], ttl=ttl)
        return token

    async def join(self, token: str, services: tuple[str, ...] = ("web",)) -> client.JoinResult:
        return await client.join(self.endpoint.url, token=token, node="n1", services=services,
                                 fingerprint=self.endpoint.fingerprint)


@pytest.fixture
async def ca(tmp_path: Path, nursery: trio.Nursery) -> CA:
    clock = [datetime.now(UTC)]
    directory = tmp_path / "ca"
    init_ca(directory, TD, now=clock[0])
    endpoint = await nursery.start(partial(serve_ca, directory, "127.0.0.1", 0,
                                           clock=lambda: clock[0]))
    return CA(endpoint, directory, clock)


async def test_join_attacks(ca: CA, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    reused = ca.mint()
    await ca.join(reused)
    expired = ca.mint(ttl=timedelta(minutes=5))
    attacks = {
        "token_used_up": (reused, ("web",)),
        "service_not_allowed": (ca.mint(("web",)), ("web", "payments")),
        "token_expired": (expired, ("web",)),
    }
    ca.clock[0] += timedelta(minutes=10)
    for code, (token, services) in attacks.items():
        with pytest.raises(CARefusedError) as info:
            await ca.join(token, services)
        assert info.value.code == code
        assert "join refused for node 'n1' from 127.0.0.1" in caplog.text
        assert f": {code}: {info.value.reason}" in caplog.text


async def test_renewal_attacks(ca: CA, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    result = await ca.join(ca.mint(("web",)))
    files.write_bundle(tmp_path, result.bundle)
    files.write_node_identity(tmp_path, result.node)
    files.write_identity(tmp_path, result.identities["web"])
    bundle = tmp_path / files.BUNDLE_FILE

    async def renew(client_files: tuple[Path, Path], services: tuple[str, ...]) -> str:
        conn = CAConnection(ca.endpoint.url, TD, bundle, client_files)
        try:
            with pytest.raises(CARefusedError) as info:
                await conn.renew("n1", services)
        finally:
            await conn.aclose()
        return info.value.code

    # no client certificate (the client library would not even try: ask by hand)
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=bundle)) as http:
        response = await http.post(f"{ca.endpoint.url}/v1/ca/renew", json={})
    assert (response.status_code, response.json()["error"]) == (401, "no_client_certificate")
    service_cert = (tmp_path / "web.crt", tmp_path / "web.key")
    assert await renew(service_cert, ("web",)) == "not_a_node_certificate"
    assert await renew(files.node_files(tmp_path), ("web", "payments")) == "service_not_allowed"
    for code in ("no_client_certificate", "not_a_node_certificate", "service_not_allowed"):
        assert f": {code}: " in caplog.text
    assert "renewal refused for spiffe://mesh.test/svc/web from 127.0.0.1" in caplog.text
