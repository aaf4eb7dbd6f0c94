"""mTLS modes per service: strict (the default) refuses plaintext; permissive accepts it on the
shared inbound listener for its one service, labelled as such, while mTLS keeps working."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio
from daemon_testing import until
from identity_testing import echo_server, write_identities

from meshd.config.parse import parse_host_config
from meshd.config.schema import (
    CASettings,
    DefaultPolicy,
    HostConfig,
    LocalService,
    MTLSMode,
    Protocol,
    RouteTable,
)
from meshd.errors import ConfigError
from meshd.httpd import Request, Response, serve_http
from meshd.identity.tls import TLSState
from meshd.metrics import Metrics
from meshd.proxy.core.view import MeshView, ViewCell
from meshd.proxy.server import Proxy
from meshd.proxy.streams import open_mtls

TD = "id.mesh"


async def headers_app(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(request: Request) -> Response:
        return Response.json({"headers": dict(request.headers)})

    async def run(*, task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
        await serve_http(handle, "127.0.0.1", 0, task_status=task_status)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(run)
        task_status.started(listeners[0].socket.getsockname()[1])


async def banner_server(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A server-speaks-first protocol (think SMTP): greets, then echoes one line."""
    async def greet(stream: trio.SocketStream) -> None:
        await stream.send_all(b"220 hello\r\n")
        data = await stream.receive_some()
        await stream.send_all(b"250 " + data)
        await stream.aclose()

    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listener.socket.getsockname()[1])
    await trio.serve_listeners(greet, [listener])


def config(tmp_path: Path, services: list[LocalService]) -> HostConfig:
    return HostConfig(
        node="b", address="127.0.0.1", trust_domain=TD, registry_url="http://127.0.0.1:1",
        ca=CASettings("https://127.0.0.1:1", "sha256:" + "0" * 64, tmp_path / "token"),
        inbound_port=0, state_dir=tmp_path, services=tuple(services))


async def start_proxy(nursery: trio.Nursery, tmp_path: Path,
                      services: list[LocalService]) -> tuple[Proxy, TLSState, Metrics]:
    write_identities(tmp_path, TD, [s.name for s in services] + ["web"])
    tls = TLSState(tmp_path, TD, [s.name for s in services] + ["web"])
    metrics = Metrics()
    proxy = Proxy(config(tmp_path, services),
                  ViewCell(MeshView(routes=RouteTable(default_policy=DefaultPolicy.ALLOW))), tls,
                  metrics)
    await nursery.start(proxy.run)
    return proxy, tls, metrics


def count(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(s.value for family in metrics.registry.collect() for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


async def test_permissive_accepts_plaintext_and_mtls_side_by_side(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    app_port = await nursery.start(headers_app)
    proxy, tls, metrics = await start_proxy(nursery, tmp_path, [
        LocalService("payments", app_port, mtls=MTLSMode.PERMISSIVE)])
    host, port = proxy.inbound_address

    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://{host}:{port}/pay",
                                  headers={"x-meshd-source": "admin"})
    assert response.status_code == 200
    # nothing is authenticated on plaintext: no identity reaches the app, not even a forged one
    assert "x-meshd-source" not in response.json()["headers"]
    assert count(metrics, "meshd_inbound_connections_total", destination="payments",
                 mtls="false") == 1
    # (counted once the response is on its way: the client may read it first)
    with trio.fail_after(5):
        await until(lambda: count(metrics, "meshd_requests_total", direction="inbound",
                                  source="unknown", destination="payments", subset="v1",
                                  code="200", mtls="false") == 1, every=0.01)

    # mutual TLS still works on the same port, with the caller's identity
    stream = await open_mtls(host, port, tls, "web", "payments")
    await stream.send_all(b"GET /pay HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n")
    answer = b""
    while data := await stream.receive_some():
        answer += data
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["headers"]["x-meshd-source"] == "web"
    assert count(metrics, "meshd_inbound_connections_total", destination="payments",
                 mtls="true") == 1
    with trio.fail_after(5):
        await until(lambda: count(metrics, "meshd_requests_total", direction="inbound",
                                  source="web", destination="payments", code="200",
                                  mtls="true") == 1, every=0.01)


async def test_permissive_tcp_where_the_server_speaks_first(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    banner_port = await nursery.start(banner_server)
    proxy, _, metrics = await start_proxy(nursery, tmp_path, [
        LocalService("smtp", banner_port, protocol=Protocol.TCP, mtls=MTLSMode.PERMISSIVE)])
    stream = await trio.open_tcp_stream(*proxy.inbound_address)
    with trio.fail_after(5):  # the greeting comes after the detection timeout (1 s)
        assert await stream.receive_some() == b"220 hello\r\n"
    await stream.send_all(b"HELO x\r\n")
    assert await stream.receive_some() == b"250 HELO x\r\n"
    await stream.aclose()
    assert count(metrics, "meshd_inbound_connections_total", destination="smtp",
                 mtls="false") == 1


async def test_strict_services_refuse_plaintext(tmp_path: Path, nursery: trio.Nursery) -> None:
    echo_port = 0

    async def start_echo(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        nonlocal echo_port
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        echo_port = listener.socket.getsockname()[1]
        await listener.aclose()
        await echo_server("127.0.0.1", echo_port, task_status=task_status)

    await nursery.start(start_echo)
    proxy, _, metrics = await start_proxy(nursery, tmp_path, [
        LocalService("ledger", echo_port, protocol=Protocol.TCP)])
    stream = await trio.open_tcp_stream(*proxy.inbound_address)
    await stream.send_all(b"hello, plaintext here\n")
    with trio.fail_after(5):
        try:
            while data := await stream.receive_some():
                assert b"hello" not in data
        except trio.BrokenResourceError:
            pass
    assert count(metrics, "meshd_connection_errors_total", direction="inbound",
                 reason="plaintext") == 1


def _host(services: list[dict[str, object]]) -> HostConfig:
    return parse_host_config({
        "node": "n", "trust_domain": TD,
        "ca": {"url": "https://ca:1", "fingerprint": "sha256:" + "0" * 64, "token_file": "t"},
        "services": services})


def test_mtls_mode_config() -> None:
    config = _host([{"name": "a", "port": 1001}, {"name": "b", "port": 1002,
                                                   "mtls": "permissive"}])
    assert [s.mtls for s in config.services] == [MTLSMode.STRICT, MTLSMode.PERMISSIVE]
    with pytest.raises(ConfigError, match=r"services\[0\]\.mtls: must be one of strict, "
                                          r"permissive, got 'off'"):
        _host([{"name": "a", "port": 1001, "mtls": "off"}])
    with pytest.raises(ConfigError, match=r"services\[1\]\.mtls: only one service per host "
                                          r"can be permissive"):
        _host([{"name": "a", "port": 1001, "mtls": "permissive"},
               {"name": "b", "port": 1002, "mtls": "permissive"}])
