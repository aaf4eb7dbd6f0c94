"""The trio shells of the resilience features over memory streams: a body kept for replay, a
response held back for a retry, requests waiting in line for a connection slot."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from meshd.config.schema import DestinationPolicy
from meshd.metrics import Metrics
from meshd.proxy.core.http1 import END, Data, Event, RequestHead
from meshd.proxy.core.retry import Body
from meshd.proxy.destinations import DestinationState
from meshd.proxy.exchange import Exchange, RequestSource
from meshd.proxy.replay import ReplayBody

CHUNKED_HEAD = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


async def _source(*pieces: bytes) -> tuple[RequestSource, RequestHead, trio.abc.Stream]:
    ours, theirs = trio.testing.memory_stream_pair()
    source = RequestSource(ours)
    await theirs.send_all(pieces[0])
    head = await source.next_event()
    assert isinstance(head, RequestHead)
    for piece in pieces[1:]:
        await theirs.send_all(piece)
    return source, head, theirs


async def _drain(body: object, count: int | None = None) -> list[Event]:
    out: list[Event] = []
    while count is None or len(out) < count:
        event = await body.next_event()  # type: ignore[attr-defined]
        assert event is not None
        out.append(event)
        if event is END:
            break
    return out


async def test_replay_then_continue_reading_the_client() -> None:
    source, head, client = await _source(CHUNKED_HEAD, b"5\r\nhello\r\n")
    body = ReplayBody(source, head, limit=100)
    first = body.for_try()
    assert await _drain(first, 1) == [Data(b"hello")]  # the try failed here
    assert body.state is Body.HELD
    await client.send_all(b"6\r\n world\r\n0\r\n\r\n")
    second = body.for_try()
    assert await _drain(second) == [Data(b"hello"), Data(b" world"), END]
    assert second.message_done and source.message_done
    assert body.complete() == b"hello world"
    third = body.for_try()  # a whole body replays without touching the client
    assert await _drain(third) == [Data(b"hello"), Data(b" world"), END]


async def test_a_body_past_the_limit_is_lost_for_further_tries() -> None:
    source, head, _ = await _source(CHUNKED_HEAD, b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n")
    body = ReplayBody(source, head, limit=7)
    first = body.for_try()
    assert await _drain(first) == [Data(b"hello"), Data(b"world"), END]  # unaffected
    assert body.state is Body.LOST and body.complete() is None
    with pytest.raises(AssertionError):
        body.for_try()


async def test_a_body_announced_too_long_is_never_kept() -> None:
    source, head, _ = await _source(
        b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n", b"0123456789")
    body = ReplayBody(source, head, limit=5)
    assert body.state is Body.HELD  # nothing read yet: a connect failure may still retry
    assert await _drain(body.for_try()) == [Data(b"0123456789"), END]
    assert body.complete() is None


async def test_body_less_request_replays_its_end() -> None:
    source, head, _ = await _source(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    body = ReplayBody(source, head, limit=0)
    assert body.state is Body.NONE
    for _ in range(3):
        assert await _drain(body.for_try()) == [END]
    assert body.complete() == b""


async def test_held_response_never_reaches_the_client_and_keeps_the_connection() -> None:
    source, head, _ = await _source(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    client_ours, client_theirs = trio.testing.memory_stream_pair()
    up_ours, up_theirs = trio.testing.memory_stream_pair()
    exchange = Exchange(head, source, client_ours, up_ours, b"GET / HTTP/1.1\r\n\r\n",
                        keep_client=True, reused_upstream=False,
                        hold=lambda response: response.status == 503)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exchange.run)
        assert await up_theirs.receive_some() == b"GET / HTTP/1.1\r\n\r\n"
        await up_theirs.send_all(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
    assert exchange.held_status == 503 and not exchange.response_started
    assert exchange.upstream_reusable  # read to its end: the connection can carry another
    with trio.move_on_after(0.1):
        assert await client_theirs.receive_some() == b"", "the client saw something"
    assert exchange.status == 0


async def test_breaker_line_wakes_in_order_and_survives_cancellation(
        autojump_clock: trio.abc.Clock) -> None:
    state = DestinationState("payments", DestinationPolicy(max_connections=1,
                                                           max_pending_requests=2), Metrics())
    order: list[str] = []

    async def request(name: str, hold: float) -> None:
        if not await state.acquire():
            order.append(f"{name} rejected")
            return
        order.append(f"{name} in")
        await trio.sleep(hold)
        state.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "a", 1.0)
        await trio.sleep(0.1)
        nursery.start_soon(request, "b", 1.0)
        await trio.sleep(0.1)
        with trio.move_on_after(0.2):  # c gives up while waiting: its place is freed
            await request("c", 1.0)
        nursery.start_soon(request, "d", 1.0)
        await trio.sleep(0.1)
        nursery.start_soon(request, "e", 1.0)  # a holds the slot, b and d wait: full
        await trio.sleep(0.1)
        nursery.start_soon(request, "f", 1.0)
    assert order == ["a in", "e rejected", "f rejected", "b in", "d in"]
    assert (state.breaker.active, state.breaker.pending) == (0, 0)


async def test_raised_limit_lets_waiting_requests_go(autojump_clock: trio.abc.Clock) -> None:
    state = DestinationState("payments", DestinationPolicy(max_connections=1), Metrics())
    assert await state.acquire()
    got: list[bool] = []

    async def waiter() -> None:
        got.append(await state.acquire())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(waiter)
        await trio.sleep(1)
        assert got == []
        state.sync(DestinationPolicy(max_connections=3))  # a reload raises the limit
    assert got == [True, True]
    assert state.breaker.active == 3
