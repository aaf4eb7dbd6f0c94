"""Mirroring: copies of requests sent to another subset, their responses thrown away.

A request picked for mirroring is copied once its own exchange is over (so the copy never
delays it), provided its whole body was kept (bodies up to ``retry.REPLAY_LIMIT``; a longer one
is not mirrored). Copies go into a bounded queue; a fixed set of worker tasks, owned by the
proxy's nursery (``Mirror.run``), sends them. When the queue is full the copy is dropped and
counted: a slow mirror target can cost copies, never memory or the primary's time. Copies carry
``x-meshd-mirror: 1`` and do not touch the destination's breaker, budget or outlier state.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

import trio

from meshd.metrics import Metrics
from meshd.proxy.core.http1 import END, Data, Event, RequestHead
from meshd.proxy.exchange import Exchange
from meshd.proxy.pool import ConnectFailed, ConnectionPool
from meshd.registry.model import Endpoint

log = logging.getLogger(__name__)

MIRROR_HEADER = (b"x-meshd-mirror", b"1")
MIRROR_QUEUE = 64
MIRROR_WORKERS = 4
MIRROR_TIMEOUT = 10.0  # per copy, when its route has no timeout


@dataclass(frozen=True, kw_only=True)
class MirrorJob:
    destination: str
    subset: str
    endpoint: Endpoint
    request: RequestHead
    head: bytes  # the upstream head, marked as a mirror
    body: bytes
    pool_key: Hashable
    connect: Callable[[], Awaitable[trio.abc.HalfCloseableStream]]
    timeout: float


class _Body:
    """A kept body as an exchange's body source."""

    def __init__(self, body: bytes) -> None:
        self._events: list[Event] = [Data(body), END] if body else [END]
        self.message_done = False

    async def next_event(self) -> Event | None:
        await trio.lowlevel.checkpoint()
        event = self._events.pop(0)
        self.message_done = event is END
        return event


class _Discard(trio.abc.Stream):
    """Where a copy's response goes."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class Mirror:
    def __init__(self, metrics: Metrics, pool: ConnectionPool, *, queue: int = MIRROR_QUEUE,
                 workers: int = MIRROR_WORKERS) -> None:
        self.metrics = metrics
        self.pool = pool
        self.workers = workers
        self._send, self._receive = trio.open_memory_channel[MirrorJob](queue)

    def submit(self, job: MirrorJob) -> bool:
        """Queue a copy; False (counted as dropped) when the queue is full."""
        try:
            self._send.send_nowait(job)
        except trio.WouldBlock:
            self._count(job, "dropped")
            return False
        return True

    def skip(self, destination: str, subset: str, why: str) -> None:
        """A request picked for mirroring that cannot be copied (``why``: a metric label)."""
        self.metrics.mirrored.labels(destination, subset, why).inc()

    def _count(self, job: MirrorJob, result: str) -> None:
        self.metrics.mirrored.labels(job.destination, job.subset, result).inc()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Send queued copies until cancelled (with the proxy)."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.workers):
                nursery.start_soon(self._worker)
            task_status.started()

    async def _worker(self) -> None:
        async for job in self._receive:
            with trio.move_on_after(job.timeout):
                try:
                    ok = await self._send_copy(job)
                except ConnectFailed as exc:
                    log.debug("mirror to %s: %s", job.endpoint.key, exc)
                    ok = False
                self._count(job, "sent" if ok else "failed")
                continue
            self._count(job, "timeout")

    async def _send_copy(self, job: MirrorJob) -> bool:
        lease = await self.pool.acquire(job.pool_key, job.connect)
        exchange = Exchange(job.request, _Body(job.body), _Discard(), lease.stream, job.head,
                            keep_client=False, reused_upstream=lease.reused)
        try:
            await exchange.run()
        finally:
            await self.pool.release(lease, exchange.upstream_reusable)
        return exchange.response_done
