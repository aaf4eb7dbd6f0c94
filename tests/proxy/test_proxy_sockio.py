"""The raw-socket stream under every data-plane connection: trio's stream contract (half-close,
closing wakes waiters, cancellation noticed, no starvation) on real sockets."""

from __future__ import annotations

import errno
import socket

import pytest
import trio
import trio.lowlevel

from meshd.proxy.pool import ConnectionPool, Connector
from meshd.proxy.sockio import YIELD_EVERY, SocketConnection, connect_tcp


def _pair() -> tuple[SocketConnection, SocketConnection]:
    a, b = socket.socketpair()
    return SocketConnection(a), SocketConnection(b)


async def test_bytes_both_ways_and_half_close() -> None:
    a, b = _pair()
    await a.send_all(b"hello")
    await a.send_eof()
    received = b""
    while data := await b.receive_some():
        received += data
    assert received == b"hello"
    await b.send_all(b"still open this way")  # the other direction survives the half-close
    assert await a.receive_some() == b"still open this way"
    await a.aclose()
    await b.aclose()


async def test_large_send_waits_for_the_reader() -> None:
    a, b = _pair()
    payload = bytes(range(256)) * 8192  # 2 MiB: far beyond the socket buffers
    received = bytearray()

    async def read_slowly() -> None:
        while len(received) < len(payload):
            received.extend(await b.receive_some(16384))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_slowly)
        with trio.fail_after(10):
            await a.send_all(payload)
    assert bytes(received) == payload


async def test_closing_wakes_a_task_waiting_to_receive() -> None:
    a, b = _pair()
    failure: list[BaseException] = []

    async def wait() -> None:
        try:
            await a.receive_some()
        except trio.ClosedResourceError as exc:
            failure.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        a.close()
    assert len(failure) == 1
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"x")
    await b.aclose()


async def test_a_reset_is_a_broken_resource() -> None:
    a, b = _pair()
    b.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    await a.send_all(b"unread")  # unread data makes the close a reset
    b.close()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):
            await a.send_all(b"x" * 65536)
    a.close()


async def test_cancellation_is_noticed_when_data_is_ready() -> None:
    a, b = _pair()
    await a.send_all(b"ready")
    with trio.CancelScope() as scope:
        scope.cancel()
        await b.receive_some()  # would not block: still a cancellation point
        pytest.fail("receive_some did not raise Cancelled")
    assert scope.cancelled_caught
    assert await b.receive_some() == b"ready"  # nothing was lost
    a.close()
    b.close()


async def test_a_connection_that_never_blocks_still_lets_others_run() -> None:
    a, b = _pair()
    others_ran = 0

    async def other() -> None:
        nonlocal others_ran
        while True:
            others_ran += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()
        before = others_ran
        for _ in range(YIELD_EVERY * 4):  # every call completes at once
            await a.send_all(b"x")
            assert await b.receive_some(1) == b"x"
        assert others_ran - before >= 4  # yielded every YIELD_EVERY operations
        nursery.cancel_scope.cancel()
    a.close()
    b.close()


async def test_connect_tcp_to_a_literal_and_to_a_name() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        for host in ("127.0.0.1", "localhost"):
            conn = await connect_tcp(host, port)
            server = await listener.accept()
            await conn.send_all(b"hi")
            assert await server.receive_some() == b"hi"
            assert conn.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await conn.aclose()
            await server.aclose()


async def test_connect_tcp_refused_is_an_oserror() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(OSError) as info:
        await connect_tcp("127.0.0.1", port)
    assert info.value.errno == errno.ECONNREFUSED


async def test_an_idle_connection_tells_when_the_peer_closed_it() -> None:
    a, b = _pair()
    assert not a.idle_unusable()  # quiet: fit for a new request
    await b.send_all(b"unasked")
    assert a.idle_unusable()  # bytes nobody asked for
    assert await a.receive_some() == b"unasked"
    assert not a.idle_unusable()
    b.close()
    assert a.idle_unusable()  # the peer's EOF is waiting
    a.close()
    assert a.idle_unusable()


async def test_the_pool_skips_idle_connections_the_peer_closed() -> None:
    pool = ConnectionPool()
    dead_ours, dead_theirs = _pair()
    live_ours, live_theirs = _pair()
    fresh, _fresh_theirs = _pair()
    leases = [await pool.acquire("k", _returning(c)) for c in (live_ours, dead_ours)]
    for lease in leases:
        await pool.release(lease, reusable=True)
    dead_theirs.close()  # the server timed it out while it sat in the pool
    lease = await pool.acquire("k", _returning(fresh))
    assert lease.stream is live_ours and lease.reused  # the dead one was closed and skipped
    assert dead_ours.idle_unusable()
    lease = await pool.acquire("k", _returning(fresh))
    assert lease.stream is fresh and not lease.reused
    for conn in (live_ours, live_theirs, fresh, _fresh_theirs, dead_ours):
        conn.close()


def _returning(conn: SocketConnection) -> Connector:
    async def connect() -> trio.abc.HalfCloseableStream:
        return conn
    return connect


async def test_receive_nowait_reads_only_what_is_already_there() -> None:
    a, b = _pair()
    assert b.receive_nowait() is None  # nothing sent: it would wait
    await a.send_all(b"ready")
    await trio.sleep(0.01)
    assert b.receive_nowait() == b"ready"
    assert b.receive_nowait() is None
    await a.send_eof()
    await trio.sleep(0.01)
    assert b.receive_nowait() == b""  # the end of the stream, as receive_some says it
    assert await b.receive_some() == b""
    await a.aclose()
    await b.aclose()
    with pytest.raises(trio.ClosedResourceError):
        b.receive_nowait()
