"""Opaque byte pumping between two streams, both directions at once, half-close respected.

When one side finishes sending (EOF), the other side gets ``send_eof`` and the opposite
direction keeps flowing until it ends too; a failure in either direction (reset, TLS error)
ends both. Backpressure is natural: a direction reads again only after the write completed.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

CHUNK = 64 * 1024


async def copy_one_way(source: trio.abc.Stream, sink: trio.abc.HalfCloseableStream,
                       count: Callable[[int], None] | None = None) -> None:
    """Copy until ``source`` ends, then half-close ``sink``. Errors propagate."""
    while True:
        data = await source.receive_some(CHUNK)
        if not data:
            break
        await sink.send_all(data)
        if count is not None:
            count(len(data))
    await sink.send_eof()


async def pump(a: trio.abc.HalfCloseableStream, b: trio.abc.HalfCloseableStream, *,
               count_a_to_b: Callable[[int], None] | None = None,
               count_b_to_a: Callable[[int], None] | None = None) -> bool:
    """Copy ``a``→``b`` and ``b``→``a`` until both directions ended. Returns True when both
    ended with an EOF, False when one failed (the other was then cut). Does not close."""
    clean = True

    async def direction(src: trio.abc.HalfCloseableStream, dst: trio.abc.HalfCloseableStream,
                        count: Callable[[int], None] | None,
                        cancel: trio.CancelScope) -> None:
        nonlocal clean
        try:
            await copy_one_way(src, dst, count)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            clean = False
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(direction, a, b, count_a_to_b, nursery.cancel_scope)
        nursery.start_soon(direction, b, a, count_b_to_a, nursery.cancel_scope)
    return clean
