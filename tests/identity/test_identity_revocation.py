"""Revocation: the deny list cuts open connections with a revoked peer and refuses new ones, on
the TLS layer and end to end (`meshd ca revoke --node` -> every meshd within seconds)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import trio
from daemon_testing import TD, app, open_mesh, single_route, start_daemon, wait_for
from identity_testing import echo_server, write_identities
from net_testing import free_port

from meshd.ca import audit, operations, store
from meshd.errors import CAError
from meshd.identity.tls import HandshakeRefused, TLSState
from meshd.proxy.streams import accept_mtls, open_mtls

HOST_A, HOST_B = "127.0.22.2", "127.0.22.3"


async def test_the_deny_list_cuts_open_connections_and_refuses_new_ones(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    ids = write_identities(tmp_path, TD, ["web", "payments"])
    tls = TLSState(tmp_path, TD, ["web", "payments"])
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    refused: list[str] = []

    async def serve(transport: trio.SocketStream) -> None:
        try:
            stream, _, _ = await accept_mtls(transport, tls)
        except HandshakeRefused as exc:
            refused.append(exc.reason)
            await trio.aclose_forcefully(transport)
            return
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    nursery.start_soon(trio.serve_listeners, serve, [listener])
    stream = await open_mtls("127.0.0.1", port, tls, "web", "payments")
    await stream.send_all(b"ping")
    assert await stream.receive_some() == b"ping"
    web = ids["web"].serial
    assert tls.open_connections(web) == 1  # the server side, tracked by its peer's serial

    assert tls.set_denylist([web.upper()]) == {web}
    assert "closed 1 open connection" in caplog.text
    with trio.fail_after(5):
        try:
            assert await stream.receive_some() == b""
        except trio.BrokenResourceError:
            pass
    await stream.aclose()
    # a new connection presenting the revoked certificate is refused after the handshake
    with trio.fail_after(5):
        try:
            again = await open_mtls("127.0.0.1", port, tls, "web", "payments")
            await again.send_all(b"x")
            assert await again.receive_some() == b""
        except (trio.BrokenResourceError, HandshakeRefused):
            pass
    await wait_until(lambda: refused == ["revoked"])
    # and a server presenting a revoked certificate is refused by the client
    tls.set_denylist([ids["payments"].serial])
    with pytest.raises(HandshakeRefused, match="revoked"):
        await open_mtls("127.0.0.1", port, tls, "web", "payments")


async def wait_until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not predicate():  # noqa: ASYNC110 - the server task is in this process
            await trio.sleep(0.01)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def test_revoking_a_node_reaches_every_meshd_within_seconds(
    nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    mesh = await open_mesh(nursery, tmp_path, http)
    app_port, echo_port = free_port(HOST_B), free_port(HOST_B)
    await nursery.start(app, HOST_B, app_port, "payments")
    await nursery.start(echo_server, HOST_B, echo_port)
    await mesh.put_routes(single_route("payments", "v1"))
    host_b = await start_daemon(nursery, mesh.host_config("host-b", HOST_B, [
        {"name": "payments", "port": app_port, "address": HOST_B,
         "health": {"http": "/healthz", "interval": "200ms"}},
        {"name": "ledger", "port": echo_port, "address": HOST_B, "protocol": "tcp",
         "health": {"tcp": True, "interval": "200ms"}}]))
    http_port, tcp_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    a_conf = mesh.host_config("host-a", HOST_A, [{
        "name": "web", "port": free_port(HOST_A), "health": {"none": True},
        "upstreams": [{"name": "payments", "local_port": http_port},
                      {"name": "ledger", "local_port": tcp_port, "protocol": "tcp"}]}])
    host_a = await start_daemon(nursery, a_conf)
    url = f"http://127.0.0.1:{http_port}/pay"

    async def answered() -> bool:
        return (await http.get(url)).status_code == 200
    await wait_for(answered)
    tcp = await trio.open_tcp_stream("127.0.0.1", tcp_port)
    await tcp.send_all(b"hello")

    async def echoed() -> bool:
        return await tcp.receive_some() == b"hello"
    await wait_for(echoed)

    revoked_at = trio.current_time()
    done = operations.revoke(mesh.ca_dir, now=datetime.now(UTC), node="host-a", who="test")
    assert len(done) == 2  # host-a's node certificate and web's

    # the open TCP stream through host-a -> host-b is cut by host-b ...
    with trio.fail_after(8):
        while True:
            try:
                if not await tcp.receive_some():
                    break
            except trio.BrokenResourceError:
                break
    # ... and new requests from host-a are refused at host-b's handshake check
    async def refused() -> bool:
        return (await http.get(url)).status_code >= 500
    await wait_for(refused)
    assert trio.current_time() - revoked_at < 8
    metrics = (await http.get(
        f"http://{host_b.config.admin_host}:{host_b.config.admin_port}/metrics")).text
    assert 'meshd_connection_errors_total{direction="inbound",reason="revoked"}' in metrics
    # the pooled HTTP connection and the TCP stream
    assert "closed 2 open connection(s) with a peer whose certificate was revoked" in caplog.text
    assert "refused (revoked): client spiffe://id.mesh/svc/web presented certificate" \
        in caplog.text
    state = host_b.state.identity
    assert state is not None and state.denied == 2
    # the revocation is in the audit log with who did it
    records = [r for r in audit.read(mesh.ca_dir) if r["action"] == "revoke"]
    assert records[0]["what"] == "node/host-a" and records[0]["who"] == "test"
    assert {r.get("serial") for r in records[1:]} == {r.serial for r in done}
    await tcp.aclose()
    await host_a.stop()
    await host_b.stop()


def test_revoke_refuses_unknown_nodes_and_serials(tmp_path: Path) -> None:
    store.init_ca(tmp_path, TD, now=datetime.now(UTC))
    with pytest.raises(CAError, match="no node 'ghost'"):
        operations.revoke(tmp_path, now=datetime.now(UTC), node="ghost")
    with pytest.raises(CAError, match="no live certificate"):
        operations.revoke(tmp_path, now=datetime.now(UTC), serial="abc")
    with pytest.raises(CAError, match="hexadecimal"):
        operations.revoke(tmp_path, now=datetime.now(UTC), serial="xyz")
