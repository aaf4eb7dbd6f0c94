"""Idle HTTP/1.1 keep-alive connections wait between requests without a task (their listener's
keep-alive room, ``meshd.proxy.server``): served again as the same connection, closed quietly at
the idle timeout, when the client goes, at a drain, when their listener is removed and when the
proxy stops, with no descriptor leaked and each connection's caps slot released once.

The proxy here has one outbound listener and no endpoints: each request is answered 503 by the
proxy itself, on a connection that stays open (a real request path, without a second host).
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from proxy_mesh_testing import OPEN, Mesh
from proxy_testing import TD, Backend, MiniCA, eventually, host_config, read_until_eof, sample

import meshd.proxy.outbound
from meshd.config.schema import LocalService, MTLSMode, Upstream
from meshd.identity.tls import TLSState
from meshd.metrics import Metrics
from meshd.proxy.core.http1 import RequestHead
from meshd.proxy.core.view import MeshView, ViewCell
from meshd.proxy.exchange import RequestSource
from meshd.proxy.forward import PARK_AFTER, ClientConnection, answer_locally, serve_requests
from meshd.proxy.server import Proxy
from meshd.proxy.sockio import SocketConnection

LISTENER = "outbound:web->orders"
REQUEST = b"GET /x HTTP/1.1\r\nHost: orders\r\n\r\n"
CLIENTS = 20


@dataclass
class Lone:
    proxy: Proxy
    metrics: Metrics
    scope: trio.CancelScope  # cancelling it stops the proxy
    stopped: trio.Event

    @property
    def address(self) -> tuple[str, int]:
        return self.proxy.outbound_address("web", "orders")

    def open(self) -> int:
        """Connections open by the proxy's books: its own count, and its caps' gauge."""
        counted = self.proxy.open_connections()["outbound"]
        assert sample(self.metrics, "meshd_connections_open", listener=LISTENER) == counted
        return counted

    def slots(self) -> int:
        """Caps slots held: the process's, and the listener's while it is there (a double
        release would go below 0)."""
        held = self.proxy.guard.process.open
        for listener in self.proxy._listeners:
            if listener.name == "web->orders":
                assert listener.guard.open == held
        return held


@pytest.fixture
async def lone(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Lone]:
    ca = MiniCA.create()
    ca.write_identity(tmp_path, "web")
    config = host_config("a", tmp_path, [LocalService("web", 1, upstreams=(
        Upstream("orders", 0),))])
    metrics = Metrics()
    proxy = Proxy(config, ViewCell(), TLSState(tmp_path, TD, ["web"]), metrics)
    scope = trio.CancelScope()
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        try:
            with scope:
                await proxy.run(task_status=task_status)
        finally:
            stopped.set()

    await nursery.start(run)
    yield Lone(proxy, metrics, scope, stopped)
    scope.cancel()
    with trio.move_on_after(5):
        await stopped.wait()


async def ask(stream: trio.abc.Stream, request: bytes = REQUEST, count: int = 1) -> list[bytes]:
    """Send ``request`` and read ``count`` whole responses (each with a Content-Length)."""
    await stream.send_all(request)
    buffered = b""
    responses: list[bytes] = []
    with trio.fail_after(5):
        while len(responses) < count:
            while b"\r\n\r\n" not in buffered:
                data = await stream.receive_some(65536)
                assert data, "the proxy closed the connection"
                buffered += data
            head, _, rest = buffered.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(rest) < length:
                data = await stream.receive_some(65536)
                assert data, "the proxy closed the connection"
                rest += data
            responses.append(head)
            buffered = rest[length:]
    assert buffered == b""
    return responses


def tasks() -> int:
    """Tasks of this trio run, all of them."""
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries
                       for child in nursery.child_tasks)
    return count(trio.lowlevel.current_root_task())  # type: ignore[arg-type]


def parked(proxy: Proxy) -> int:
    return sum(len(room) for listener in proxy._listeners for room in listener.rooms.values())


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def connect_and_ask(lone: Lone, count: int) -> list[trio.SocketStream]:
    streams = []
    for _ in range(count):
        stream = await trio.open_tcp_stream(*lone.address)
        streams.append(stream)
        (head,) = await ask(stream)
        assert head.startswith(b"HTTP/1.1 503 ")
    await eventually(lambda: parked(lone.proxy) == count)
    return streams


async def close_all(streams: list[trio.SocketStream]) -> None:
    for stream in streams:
        await trio.aclose_forcefully(stream)


async def test_idle_connections_wait_without_a_task_and_serve_again(lone: Lone) -> None:
    before = tasks()
    streams = await connect_and_ask(lone, CLIENTS)
    try:
        # each is idle between requests: counted open, its slot held, and no task of its own
        assert lone.open() == CLIENTS and lone.slots() == CLIENTS
        assert tasks() - before < CLIENTS // 2
        for stream in streams:  # the same connections carry their next requests
            (head,) = await ask(stream)
            assert head.startswith(b"HTTP/1.1 503 ")
            assert b"connection: close" not in head.lower()
        await eventually(lambda: parked(lone.proxy) == CLIENTS)
        assert lone.open() == CLIENTS and lone.slots() == CLIENTS
    finally:
        await close_all(streams)


async def test_clients_pausing_around_the_park_delay_are_all_answered(lone: Lone) -> None:
    # pauses on both sides of PARK_AFTER: connections park and wake while others are served
    rand = random.Random(18)
    answered = 0

    async def client(pauses: list[float]) -> None:
        nonlocal answered
        async with await trio.open_tcp_stream(*lone.address) as stream:
            for pause in pauses:
                (head,) = await ask(stream)
                assert head.startswith(b"HTTP/1.1 503 ")
                answered += 1
                await trio.sleep(pause)

    fds = descriptors()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(CLIENTS):
                nursery.start_soon(client, [rand.uniform(0, 3 * PARK_AFTER) for _ in range(10)])
    assert answered == CLIENTS * 10
    await eventually(lambda: lone.open() == 0)
    assert lone.slots() == 0 and parked(lone.proxy) == 0
    assert descriptors() <= fds + 1


async def test_pipelined_requests_are_all_answered_before_parking(lone: Lone) -> None:
    async with await trio.open_tcp_stream(*lone.address) as stream:
        heads = await ask(stream, REQUEST * 3, count=3)
        assert all(head.startswith(b"HTTP/1.1 503 ") for head in heads)
        await eventually(lambda: parked(lone.proxy) == 1)
        # a request split around the wait is put together by the task that resumes
        await stream.send_all(REQUEST[:10])
        await eventually(lambda: parked(lone.proxy) == 0)
        heads = await ask(stream, REQUEST[10:] + REQUEST, count=2)
        assert all(head.startswith(b"HTTP/1.1 503 ") for head in heads)


async def test_idle_timeout_closes_parked_connections_quietly(
        lone: Lone, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meshd.proxy.outbound, "CLIENT_IDLE_TIMEOUT", 1.0)
    fds = descriptors()
    streams = await connect_and_ask(lone, CLIENTS)
    try:
        for stream in streams:  # closed without a byte (no 408: it was between requests)
            assert await read_until_eof(stream) == b""
        await eventually(lambda: lone.open() == 0)
        assert lone.slots() == 0 and parked(lone.proxy) == 0
    finally:
        await close_all(streams)
    assert descriptors() <= fds + 1  # (the keep-alive room's selector)


async def test_each_stay_in_the_room_has_a_whole_idle_timeout(
        lone: Lone, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection parked again after a request is closed an idle timeout after that
    request, not after its first stay's deadline."""
    monkeypatch.setattr(meshd.proxy.outbound, "CLIENT_IDLE_TIMEOUT", 1.0)
    (stream,) = await connect_and_ask(lone, 1)
    try:
        await trio.sleep(0.6)
        (head,) = await ask(stream)  # woken, served, parked again
        assert head.startswith(b"HTTP/1.1 503 ")
        await eventually(lambda: parked(lone.proxy) == 1)
        await trio.sleep(0.6)  # past the first stay's deadline, well before the second's
        (head,) = await ask(stream)
        assert head.startswith(b"HTTP/1.1 503 ")
        assert await read_until_eof(stream) == b""  # and then the idle timeout closes it
        await eventually(lambda: lone.open() == 0)
    finally:
        await trio.aclose_forcefully(stream)


@pytest.mark.parametrize("woken", [True, False])
async def test_a_woken_connection_is_answered_though_a_drain_began(woken: bool) -> None:
    """Bytes that woke a parked connection are a request that came while it was idle: if a
    drain begins before its new task runs, the request is still answered (then the connection
    closes); a connection merely idle when the drain began is closed unread."""
    a, b = socket.socketpair()
    client, server = SocketConnection(a), SocketConnection(b)
    conn = ClientConnection("127.0.0.1", draining=True, served=True)
    seen: list[bytes] = []

    async def handle(request: RequestHead, source: RequestSource, conn: ClientConnection
                     ) -> bool:
        seen.append(request.target)
        return await answer_locally(source, request, conn, 200, "ok")

    try:
        await client.send_all(REQUEST)
        with trio.fail_after(5):
            await serve_requests(server, conn, handle, 10.0, woken=woken)
        server.close()
        answer = await read_until_eof(client)
        if woken:
            assert seen == [b"/x"] and answer.startswith(b"HTTP/1.1 200 "), answer
            assert b"connection: close" in answer.lower()
        else:
            assert seen == [] and answer == b""
    finally:
        client.close()
        server.close()


async def test_a_client_that_leaves_while_parked_is_cleaned_up(lone: Lone) -> None:
    fds = descriptors()
    streams = await connect_and_ask(lone, CLIENTS)
    await close_all(streams[: CLIENTS // 2])
    await eventually(lambda: lone.open() == CLIENTS - CLIENTS // 2)
    assert lone.slots() == CLIENTS - CLIENTS // 2 and parked(lone.proxy) == CLIENTS - CLIENTS // 2
    await close_all(streams[CLIENTS // 2:])
    await eventually(lambda: lone.open() == 0)
    assert lone.slots() == 0
    assert descriptors() <= fds + 1


async def test_drain_closes_parked_connections_at_once(lone: Lone) -> None:
    fds = descriptors()
    streams = await connect_and_ask(lone, CLIENTS)
    try:
        with trio.fail_after(2):  # (the drain's deadline is 10 s away)
            await lone.proxy.drain(trio.current_time() + 10)
        for stream in streams:
            assert await read_until_eof(stream) == b""
        assert lone.open() == 0 and lone.slots() == 0
    finally:
        await close_all(streams)
    assert descriptors() <= fds - 1  # its listening socket is closed too


async def test_stopping_the_proxy_closes_parked_connections(lone: Lone) -> None:
    fds = descriptors()
    streams = await connect_and_ask(lone, CLIENTS)
    try:
        lone.scope.cancel()
        with trio.fail_after(5):
            await lone.stopped.wait()
        for stream in streams:
            assert await read_until_eof(stream) == b""
        assert lone.open() == 0 and lone.slots() == 0
    finally:
        await close_all(streams)
    assert descriptors() <= fds - 1


async def test_removing_the_listener_closes_its_parked_connections(lone: Lone) -> None:
    streams = await connect_and_ask(lone, CLIENTS)
    try:
        with trio.fail_after(2):
            cut = await lone.proxy.remove_outbound("web", "orders", trio.current_time() + 10)
        assert cut == 0  # idle: closed, not cut
        for stream in streams:
            assert await read_until_eof(stream) == b""
        assert lone.open() == 0 and lone.slots() == 0
    finally:
        await close_all(streams)


async def test_tls_connections_between_meshds_keep_their_task(mesh: Mesh) -> None:
    # host A's pooled mTLS connection to host B's inbound listener: TLS stays as it was
    async with await trio.open_tcp_stream(*mesh.a.proxy.outbound_address("web", "payments")) \
            as stream:
        await stream.send_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        with trio.fail_after(5):
            while not answer.endswith(b"}}"):
                answer += await stream.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        await eventually(lambda: parked(mesh.a.proxy) == 1)  # the app's plaintext connection
        assert parked(mesh.b.proxy) == parked(mesh.c.proxy) == 0
        assert sum(mesh.b.proxy.open_connections().values()) + \
            sum(mesh.c.proxy.open_connections().values()) >= 1


async def test_permissive_inbound_plaintext_connections_park_too(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    app = Backend("payments", "v1")
    await nursery.start(app.serve)
    ca = MiniCA.create()
    ca.write_identity(tmp_path, "payments")
    config = host_config("b", tmp_path, [LocalService("payments", app.port,
                                                      mtls=MTLSMode.PERMISSIVE)])
    proxy = Proxy(config, ViewCell(MeshView(routes=OPEN)),
                  TLSState(tmp_path, TD, ["payments"]), Metrics())
    await nursery.start(proxy.run)
    async with await trio.open_tcp_stream(*proxy.inbound_address) as stream:
        for _ in range(2):  # the second request on the connection that was parked
            await stream.send_all(b"GET /version HTTP/1.1\r\nHost: payments\r\n\r\n")
            answer = b""
            with trio.fail_after(5):
                while not answer.endswith(b"}}"):
                    answer += await stream.receive_some(65536)
            assert answer.startswith(b"HTTP/1.1 200")
            await eventually(lambda: parked(proxy) == 1)
            assert proxy.open_connections()["inbound"] == 1
        assert app.requests == 2
    await eventually(lambda: proxy.open_connections()["inbound"] == 0)
    assert proxy.guard.process.open == 0
