"""The pooling policy (pure), then the pool and exchange shells over memory streams."""

from __future__ import annotations

import trio
import trio.testing

from meshd.proxy.attempts import Attempts
from meshd.proxy.core.http1 import RequestHead
from meshd.proxy.exchange import Exchange, RequestSource
from meshd.proxy.forward import ClientConnection
from meshd.proxy.pool import ConnectFailed, ConnectionPool, Connector, IdleConnections


def test_reuse_most_recent_first_and_keys_apart() -> None:
    idle: IdleConnections[str] = IdleConnections(idle_timeout=30)
    assert idle.checkout("k", 0) == (None, [])
    idle.checkin("k", "c1", 0)
    idle.checkin("k", "c2", 1)
    idle.checkin("other", "o1", 1)
    assert idle.checkout("k", 2) == ("c2", [])
    assert idle.checkout("k", 2) == ("c1", [])
    assert idle.checkout("k", 2) == (None, [])
    assert len(idle) == 1


def test_idle_connections_expire() -> None:
    idle: IdleConnections[str] = IdleConnections(idle_timeout=30)
    idle.checkin("k", "old", 0)
    idle.checkin("k", "new", 20)
    assert idle.next_expiry() == 30
    assert idle.checkout("k", 30) == ("new", ["old"])
    idle.checkin("k", "new", 31)
    idle.checkin("j", "j1", 40)
    assert idle.expire(61) == ["new"]
    assert idle.expire(100) == ["j1"]
    assert idle.next_expiry() is None


def test_a_connection_parked_with_its_own_idle_timeout_expires_at_it() -> None:
    idle: IdleConnections[str] = IdleConnections(idle_timeout=30)
    idle.checkin("slow", "s1", 0)
    idle.checkin("quick", "q1", 0, idle_timeout=5)
    assert idle.next_expiry() == 5
    assert idle.expire(4.9) == []
    assert idle.expire(5) == ["q1"]
    assert idle.next_expiry() == 30
    assert idle.checkout("slow", 29) == ("s1", [])


def test_surplus_idle_connections_are_evicted_oldest_first() -> None:
    idle: IdleConnections[str] = IdleConnections(idle_timeout=30, max_per_key=2)
    assert idle.checkin("k", "a", 0) == []
    assert idle.checkin("k", "b", 1) == []
    assert idle.checkin("k", "c", 2) == ["a"]
    assert sorted(idle.take_all()) == ["b", "c"]


async def test_pool_reaper_closes_idle_connections(autojump_clock: trio.abc.Clock) -> None:
    pool = ConnectionPool(idle_timeout=30)
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        lease = await pool.acquire("k", _returns(left))
        await pool.release(lease, reusable=True)
        assert pool.idle_count == 1
        await trio.sleep(29)
        assert pool.idle_count == 1
        await trio.sleep(2)
        assert pool.idle_count == 0
        assert await right.receive_some() == b""  # closed
        nursery.cancel_scope.cancel()


async def test_reaper_closes_each_connection_at_its_own_timeout(
        autojump_clock: trio.abc.Clock) -> None:
    """One pool serves destinations with different idle timeouts: a connection parked with a
    short one while the reaper sleeps until a long one's expiry is still closed on time."""
    pool = ConnectionPool(idle_timeout=30)
    long_left, long_right = trio.testing.memory_stream_pair()
    short_left, short_right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        lease = await pool.acquire("long", _returns(long_left))
        await pool.release(lease, reusable=True, idle_timeout=300)
        await trio.sleep(1)
        lease = await pool.acquire("default", _returns(short_left))
        await pool.release(lease, reusable=True)  # the pool's 30 s
        await trio.sleep(31)
        assert pool.idle_count == 1  # the default one went at t=31, the long one stays
        with trio.fail_after(1):
            assert await short_right.receive_some() == b""
        await trio.sleep(300)
        assert pool.idle_count == 0
        assert await long_right.receive_some() == b""
        nursery.cancel_scope.cancel()


def _returns(stream: trio.abc.HalfCloseableStream) -> Connector:
    async def connect() -> trio.abc.HalfCloseableStream:
        return stream
    return connect


async def _fake_upstream(stream: trio.abc.Stream, answer: bytes) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some()
    await stream.send_all(answer)


async def test_stale_pooled_connection_is_retried_on_a_new_one() -> None:
    """The server closed every pooled connection (it restarted): the retry takes a new
    connection, not the next dead one, and the other dead ones are dropped."""
    pool = ConnectionPool()
    leases = []
    for _ in range(3):
        stale_ours, stale_theirs = trio.testing.memory_stream_pair()
        await stale_theirs.aclose()  # the server closed it while it sat in the pool
        leases.append(await pool.acquire("k", _returns(stale_ours)))
    for lease in leases:
        await pool.release(lease, reusable=True)
    assert pool.idle_count == 3
    pool.opened = 0

    fresh_ours, fresh_theirs = trio.testing.memory_stream_pair()
    client_ours, client_theirs = trio.testing.memory_stream_pair()
    source = RequestSource(client_ours)
    await client_theirs.send_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await source.next_event()
    assert isinstance(head, RequestHead)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_fake_upstream, fresh_theirs,
                           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        result = await Attempts(head, source, ClientConnection("test"),
                                pool=pool, key="k", connect=_returns(fresh_ours),
                                upstream_head=b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n",
                                timeout=5).run()
    assert (result.status, result.keep) == (200, True)
    assert pool.opened == 1  # the fresh one
    assert pool.idle_count == 1  # the fresh one, back; the dead ones are gone
    answer = await client_theirs.receive_some()
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"ok")


async def test_connect_failure_is_a_503_and_keeps_the_client() -> None:
    async def refuse() -> trio.abc.HalfCloseableStream:
        raise ConnectFailed("connect_failed", "cannot connect to 10.0.0.1:15001: refused")

    client_ours, client_theirs = trio.testing.memory_stream_pair()
    source = RequestSource(client_ours)
    await client_theirs.send_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await source.next_event()
    assert isinstance(head, RequestHead)
    result = await Attempts(head, source, ClientConnection("test"),
                            pool=ConnectionPool(), key="k", connect=refuse,
                            upstream_head=b"", timeout=None).run()
    assert (result.status, result.keep, result.code) == (503, True, "connect-failed")
    answer = await client_theirs.receive_some()
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert b"x-meshd-error: connect-failed\r\n" in answer


async def test_early_response_leaves_neither_connection_reusable() -> None:
    """The server answers 413 without reading the body: relayed, then both sides closed."""
    client_ours, client_theirs = trio.testing.memory_stream_pair()
    up_ours, up_theirs = trio.testing.memory_stream_pair()
    source = RequestSource(client_ours)
    await client_theirs.send_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
                                 + b"x" * 1000)
    head = await source.next_event()
    assert isinstance(head, RequestHead)
    exchange = Exchange(head, source, client_ours, up_ours, b"POST /x HTTP/1.1\r\n\r\n",
                        keep_client=True, reused_upstream=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_fake_upstream, up_theirs,
                           b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        with trio.fail_after(5):
            await exchange.run()
    assert exchange.status == 413 and exchange.response_done
    assert not exchange.request_done
    assert not exchange.client_reusable and not exchange.upstream_reusable
