"""Opaque byte pumping between two streams, both directions at once, half-close respected.

When one side finishes sending (EOF), the other side gets ``send_eof`` and the opposite
direction keeps flowing until it ends too; a failure in either direction (reset, TLS error)
ends both. Backpressure is natural: a direction reads again only after the write completed.
An idle timeout (no byte either way for that long) ends both too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


class Activity:
    """When a byte last moved, either way (for an idle timeout)."""

    def __init__(self) -> None:
        self.last = trio.current_time()

    def touch(self) -> None:
        self.last = trio.current_time()


async def copy_one_way(source: trio.abc.Stream, sink: trio.abc.HalfCloseableStream,
                       count: Callable[[int], None] | None = None,
                       activity: Activity | None = None) -> None:
    """Copy until ``source`` ends, then half-close ``sink``. Errors propagate. ``activity``
    is touched when bytes arrive and when they have been passed on (a slow write is not
    idleness)."""
    while True:
        data = await source.receive_some(CHUNK)
        if not data:
            break
        if activity is not None:
            activity.touch()
        await sink.send_all(data)
        if activity is not None:
            activity.touch()
        if count is not None:
            count(len(data))
    await sink.send_eof()


async def pump(a: trio.abc.HalfCloseableStream, b: trio.abc.HalfCloseableStream, *,
               count_a_to_b: Callable[[int], None] | None = None,
               count_b_to_a: Callable[[int], None] | None = None,
               idle_timeout: float | None = None) -> bool:
    """Copy ``a``→``b`` and ``b``→``a`` until both directions ended. Returns True when both
    ended with an EOF, False when one failed (the other was then cut) or when no byte moved
    either way for ``idle_timeout`` seconds (both were then cut). Does not close."""
    clean = True
    activity = Activity() if idle_timeout is not None else None

    async def direction(src: trio.abc.HalfCloseableStream, dst: trio.abc.HalfCloseableStream,
                        count: Callable[[int], None] | None,
                        cancel: trio.CancelScope) -> None:
        nonlocal clean
        try:
            await copy_one_way(src, dst, count, activity)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            clean = False
            cancel.cancel()

    async def watch(activity: Activity, limit: float, cancel: trio.CancelScope) -> None:
        nonlocal clean
        while True:  # sleep until the deadline the last byte set; it may have moved on since
            await trio.sleep_until(activity.last + limit)
            if trio.current_time() >= activity.last + limit:
                break
        log.info("closing a TCP connection idle for %gs", limit)
        clean = False
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        if activity is not None and idle_timeout is not None:
            nursery.start_soon(watch, activity, idle_timeout, nursery.cancel_scope)
        async with trio.open_nursery() as directions:
            directions.start_soon(direction, a, b, count_a_to_b, nursery.cancel_scope)
            directions.start_soon(direction, b, a, count_b_to_a, nursery.cancel_scope)
        nursery.cancel_scope.cancel()  # both directions ended: stop the idle watch
    return clean
