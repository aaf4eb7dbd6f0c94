"""The Proxy's lifetime: binding, readiness, graceful drain."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import httpx
import pytest
import trio
from proxy_mesh_testing import Mesh
from proxy_testing import TD, MiniCA, host_config, read_until_eof, sample

from meshd.config.schema import LocalService, Upstream
from meshd.errors import ProxyError
from meshd.identity.tls import TLSState
from meshd.metrics import Metrics
from meshd.proxy.core.view import ViewCell
from meshd.proxy.server import Proxy


async def test_port_in_use_names_the_address(tmp_path: Path) -> None:
    ca = MiniCA.create()
    ca.write_identity(tmp_path, "web")
    (taken,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = taken.socket.getsockname()[1]
    config = host_config("a", tmp_path, [LocalService("web", 1, upstreams=(
        Upstream("payments", port),))])
    proxy = Proxy(config, ViewCell(), TLSState(tmp_path, TD, ["web"]), Metrics())
    with pytest.raises(ProxyError, match=f"cannot listen on 127.0.0.1:{port} "
                                         r"\(outbound web->payments\)"):
        await proxy.run()
    # the inbound listener it had already opened was released again
    with pytest.raises(RuntimeError):
        _ = proxy.inbound_address
    await taken.aclose()


async def test_drain_finishes_requests_in_flight_and_stops_accepting(mesh: Mesh) -> None:
    host, port = mesh.a.proxy.outbound_address("web", "payments")
    idle = await trio.open_tcp_stream(host, port)
    await idle.send_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith(b"}}"):  # the whole JSON response
        answer += await idle.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 200")
    results = []

    async def slow_request() -> None:
        async with httpx.AsyncClient(base_url=mesh.url()) as client:
            response = await client.get("/slow", params={"delay": "0.5"})
            results.append((response.status_code, response.headers.get("connection")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_request)
        await trio.sleep(0.2)
        started = trio.current_time()
        await mesh.a.proxy.drain(trio.current_time() + 5)
        elapsed = trio.current_time() - started
    assert results == [(200, None)] or results == [(200, "close")]
    assert 0.2 < elapsed < 2
    assert await read_until_eof(idle) == b""  # the idle keep-alive connection was closed
    with pytest.raises(OSError):
        await trio.open_tcp_stream(host, port)


async def test_drain_deadline_cuts_what_is_left(mesh: Mesh) -> None:
    host, port = mesh.a.proxy.outbound_address("web", "payments")
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(b"GET /slow?delay=10 HTTP/1.1\r\nHost: x\r\n\r\n")
    await trio.sleep(0.1)
    started = trio.current_time()
    await mesh.a.proxy.drain(trio.current_time() + 0.3)
    assert trio.current_time() - started < 1.5
    assert await read_until_eof(stream) == b""


async def test_accept_backs_off_when_out_of_file_descriptors(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    ca = MiniCA.create()
    ca.write_identity(tmp_path, "web")
    config = host_config("a", tmp_path, [LocalService("web", 1, upstreams=(
        Upstream("orders", 0),))])
    metrics = Metrics()
    proxy = Proxy(config, ViewCell(), TLSState(tmp_path, TD, ["web"]), metrics)
    await nursery.start(proxy.run)
    host, port = proxy.outbound_address("web", "orders")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    fillers: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
        while True:  # fill the descriptor table...
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        os.close(fillers.pop())  # ...but for one slot, which our client takes
        client = await trio.open_tcp_stream(host, port)
        await trio.sleep(0.1)  # the proxy cannot accept it: EMFILE
        assert sample(metrics, "meshd_connection_errors_total", direction="outbound",
                      reason="accept_failed") >= 1
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # descriptors are back: the connection waiting in the backlog is served
    await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await read_until_eof(client)).startswith(b"HTTP/1.1 503 ")
