"""Keep-alive connection pooling.

``IdleConnections`` is the policy, pure and synchronous (``now`` passed in): which idle
connection to reuse, which have idled too long, which to evict. ``ConnectionPool`` is the trio
shell: it opens connections through a connector (which raises ``ConnectFailed``), hands them
out, takes them back, and closes what the policy returns.

A connection goes back to the pool only when the exchange that used it ended cleanly: the whole
request sent, the whole response read, no ``Connection: close``, nothing extra from the server.
One that shows, when taken out, that the server closed it meanwhile (EOF or bytes waiting) is
closed and the next one tried; and when a reused connection fails before any answer, the caller
drops the key's other idle ones (``discard_idle``): a restarted or draining server closed them
all.
Idle connections are dropped after ``idle_timeout`` (30 s for mesh hops: before any peer's own
keep-alive timeout, so a reused connection is rarely one the peer is closing).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from meshd.errors import ProxyError

log = logging.getLogger(__name__)

C = TypeVar("C")

DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_MAX_IDLE_PER_KEY = 256  # beyond it, connections handed back are closed


@dataclass
class _Idle(Generic[C]):
    conn: C
    until: float  # closed when still idle at this time


@dataclass
class IdleConnections(Generic[C]):
    """Idle connections per key, most recently used reused first (so surplus ones age out).
    Each is kept ``idle_timeout`` seconds, or the timeout given when it was parked."""

    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_per_key: int = DEFAULT_MAX_IDLE_PER_KEY
    _idle: dict[Hashable, list[_Idle[C]]] = field(default_factory=dict)

    def checkout(self, key: Hashable, now: float) -> tuple[C | None, list[C]]:
        """A reusable connection for ``key`` (or None) and the expired ones to close."""
        expired = self._expire_key(key, now)
        stack = self._idle.get(key)
        if not stack:
            return None, expired
        conn = stack.pop().conn
        if not stack:
            del self._idle[key]
        return conn, expired

    def checkin(self, key: Hashable, conn: C, now: float,
                idle_timeout: float | None = None) -> list[C]:
        """Park ``conn`` (for ``idle_timeout``, else the pool's); returns connections evicted
        to respect ``max_per_key``."""
        stack = self._idle.setdefault(key, [])
        timeout = self.idle_timeout if idle_timeout is None else idle_timeout
        stack.append(_Idle(conn, now + timeout))
        evicted = []
        while len(stack) > self.max_per_key:
            evicted.append(stack.pop(0).conn)
        return evicted

    def expire(self, now: float) -> list[C]:
        """Every connection idle past its timeout, removed from the pool."""
        return [c for key in list(self._idle) for c in self._expire_key(key, now)]

    def next_expiry(self) -> float | None:
        ends = [entry.until for stack in self._idle.values() for entry in stack]
        return min(ends) if ends else None

    def take_key(self, key: Hashable) -> list[C]:
        """Every idle connection for ``key``, removed from the pool."""
        return [entry.conn for entry in self._idle.pop(key, [])]

    def take_all(self) -> list[C]:
        conns = [entry.conn for stack in self._idle.values() for entry in stack]
        self._idle.clear()
        return conns

    def __len__(self) -> int:
        return sum(len(stack) for stack in self._idle.values())

    def __bool__(self) -> bool:
        return bool(self._idle)

    def _expire_key(self, key: Hashable, now: float) -> list[C]:
        stack = self._idle.get(key)
        if not stack:
            return []
        for entry in stack:  # on every checkout: nothing is built when none has expired
            if entry.until <= now:
                break
        else:
            return []
        keep = [entry for entry in stack if entry.until > now]
        expired = [entry.conn for entry in stack if entry.until <= now]
        if keep:
            self._idle[key] = keep
        else:
            del self._idle[key]
        return expired


@dataclass
class Lease:
    """A connection handed out by the pool; ``reused`` tells whether it carried an exchange
    before (then a server close before any response byte means "stale", not "failed")."""

    key: Hashable
    stream: trio.abc.HalfCloseableStream
    reused: bool


class ConnectFailed(ProxyError):
    """No upstream connection could be made (what a ``Connector`` raises). ``reason`` is the
    metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


Connector = Callable[[], Awaitable[trio.abc.HalfCloseableStream]]


class ConnectionPool:
    """Pooled connections by key; ``run`` must be started (it closes idle connections)."""

    def __init__(self, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_idle_per_key: int = DEFAULT_MAX_IDLE_PER_KEY) -> None:
        self._idle: IdleConnections[trio.abc.HalfCloseableStream] = IdleConnections(
            idle_timeout, max_idle_per_key)
        self._changed = trio.Event()
        self._reaper_deadline = math.inf  # when the reaper wakes next by itself
        self.opened = 0  # connections opened through this pool, for tests and /v1/state
        self._closed = False

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def acquire(self, key: Hashable, connect: Connector) -> Lease:
        """A pooled connection for ``key``, or a new one from ``connect`` (whose exceptions
        propagate)."""
        while True:
            conn, expired = self._idle.checkout(key, trio.current_time())
            if expired:
                await _close_all(expired)
            if conn is None:
                break
            if not _closed_by_peer(conn):
                return Lease(key, conn, reused=True)
            await trio.aclose_forcefully(conn)
        stream = await connect()
        self.opened += 1
        return Lease(key, stream, reused=False)

    async def discard_idle(self, key: Hashable) -> None:
        """Close every idle connection for ``key``: one of them turned out closed by the peer
        (a restarted or draining server closes them all), so a retry must get a new one."""
        await _close_all(self._idle.take_key(key))

    async def release(self, lease: Lease, reusable: bool,
                      idle_timeout: float | None = None) -> None:
        """Give a connection back: parked (for ``idle_timeout``, else the pool's) when
        ``reusable`` and the pool is open, else closed."""
        if not reusable or self._closed:
            await trio.aclose_forcefully(lease.stream)
            return
        now = trio.current_time()
        evicted = self._idle.checkin(lease.key, lease.stream, now, idle_timeout)
        until = now + (self._idle.idle_timeout if idle_timeout is None else idle_timeout)
        if until < self._reaper_deadline:
            self._reaper_deadline = until
            self._changed.set()  # the reaper sleeps past this one's expiry: wake it
        if evicted:
            await _close_all(evicted)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close connections as they pass their idle timeout; on cancellation close them all."""
        task_status.started()
        try:
            while True:
                deadline = self._idle.next_expiry()
                self._reaper_deadline = deadline if deadline is not None else math.inf
                with trio.move_on_at(self._reaper_deadline):
                    await self._changed.wait()
                    self._changed = trio.Event()
                await _close_all(self._idle.expire(trio.current_time()))
        finally:
            self._closed = True
            with trio.CancelScope(shield=True):
                await _close_all(self._idle.take_all())


def _closed_by_peer(conn: trio.abc.HalfCloseableStream) -> bool:
    """Whether an idle connection shows it was closed at the other end while it waited (the
    streams of ``meshd.proxy.sockio`` and ``streams`` can tell without blocking)."""
    probe = getattr(conn, "idle_unusable", None)
    return bool(probe is not None and probe())


async def _close_all(conns: list[trio.abc.HalfCloseableStream]) -> None:
    for conn in conns:
        await trio.aclose_forcefully(conn)
