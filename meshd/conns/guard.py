"""Caps at accept, as a trio shell over ``meshd.conns.limits``: every listener of the data plane,
the admin API, the CA and the embedded registry accept through ``accept_loop``.

A connection over a cap is closed right after ``accept``, before a task, a TLS object or a
parser exists for it: refusing costs one system call and no memory. Each refusal is counted
(``meshd_connections_refused_total{listener,reason}`` where there is a metrics registry) and
reported by a log line naming the listener, the source and the cap, at most one per listener
and reason every 10 s. After a flood (``TrimPolicy``) the freed memory is handed back to the
system (``meshd.conns.memory``) by ``ConnectionGuard.run``, off the connections' path. Where
the client speaks first, a connection waits for its first bytes without a task
(``meshd.conns.waiting``).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from meshd.config.schema import ListenerLimits
from meshd.conns import memory
from meshd.conns.fdlimit import connection_budget
from meshd.conns.limits import Admission, ProcessCount, RefusalLog, TrimPolicy
from meshd.conns.waiting import WaitingRoom
from meshd.metrics import Metrics

log = logging.getLogger(__name__)

# accept() failures that mean "out of resources for now": back off instead of crashing
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
MAX_ACCEPT_BACKOFF = 1.0
# a flood's connections close over a while: trim once, this long after the first sign
TRIM_DELAY = 0.5


class ConnectionGuard:
    """The listeners of one process (or of one server), their shared cap (by default what the
    file-descriptor limit leaves room for) and the memory hand-back after floods. ``run`` must
    be running for the hand-back; the caps work without it."""

    def __init__(self, process_limit: int | None = None, *,
                 metrics: Metrics | None = None) -> None:
        self.process = ProcessCount(process_limit or connection_budget())
        self.metrics = metrics
        self.refusal_log = RefusalLog()
        self.trim_policy = TrimPolicy()
        self.trims = 0  # floods handed back so far
        self._trim_wanted = trio.Event()

    def listener(self, name: str, limits: ListenerLimits) -> ListenerGuard:
        if limits.max_connections > self.process.limit:
            log.info("%s listener: max_connections = %d is more than the open file limit "
                     "leaves room for (%d connections); the lower figure applies", name,
                     limits.max_connections, self.process.limit)
        return ListenerGuard(self, name, limits)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        while True:
            await self._trim_wanted.wait()
            await trio.sleep(TRIM_DELAY)
            self._trim_wanted = trio.Event()
            await self.hand_back_memory()

    async def hand_back_memory(self) -> None:
        """Free cycles, then give the C allocator's free pages back (in a worker thread:
        ``malloc_trim`` walks the whole heap, and releases the interpreter meanwhile)."""
        started = trio.current_time()
        memory.collect_cycles()
        trimmed = await trio.to_thread.run_sync(memory.trim)
        self.trims += 1
        log.debug("handed memory back after a flood (%d connections open; trim %s) in %.0f ms",
                  self.process.open, "done" if trimmed else "unavailable",
                  (trio.current_time() - started) * 1000)

    def _opened(self) -> None:
        self.trim_policy.opened(self.process.open)

    def _closed(self) -> None:
        if self.trim_policy.closed(self.process.open):
            self._trim_wanted.set()


class ListenerGuard:
    """One listener's caps: ``admit`` at accept, ``release`` when the connection closes."""

    def __init__(self, guard: ConnectionGuard, name: str, limits: ListenerLimits) -> None:
        self.guard = guard
        self.name = name
        self.admission = Admission(limits, guard.process)
        self._gauge: Any = (guard.metrics.connections_open.labels(name)
                            if guard.metrics is not None else None)

    @property
    def open(self) -> int:
        return self.admission.open

    def admit(self, source: str) -> bool:
        """Count a connection from ``source`` in, or refuse it: counted, logged (rate
        limited) and False; the caller closes it at once."""
        reason = self.admission.admit(source)
        if reason is None:
            self.guard._opened()
            if self._gauge is not None:
                self._gauge.set(self.admission.open)
            return True
        guard = self.guard
        if guard.metrics is not None:
            guard.metrics.connections_refused.labels(self.name, reason.value).inc()
        held = guard.refusal_log.should_log(self.name, reason, trio.current_time())
        if held is not None:
            more = f" (and {held} more since the last such line)" if held else ""
            log.warning("%s listener: refused a connection from %s: %s%s", self.name, source,
                        self.admission.describe(reason, source), more)
        return False

    def release(self, source: str) -> None:
        self.admission.release(source)
        if self._gauge is not None:
            self._gauge.set(self.admission.open)
        self.guard._closed()


def peer_host(sock: trio.socket.SocketType) -> str | None:
    """The source address of an accepted socket (None: it was reset meanwhile)."""
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return None


async def accept_loop(listener: trio.SocketListener, guard: ListenerGuard,
                      serve: Callable[[trio.SocketStream, str], Awaitable[bool | None]],
                      connections: trio.Nursery,
                      on_accept_error: Callable[[OSError], None] | None = None, *,
                      first_byte_timeout: float | None = None,
                      on_silent: Callable[[str], None] | None = None) -> None:
    """Accept until cancelled: each connection the caps admit is served by ``serve(stream,
    source)`` in ``connections`` (and released when that returns, unless it returns True: it
    kept the connection open beyond its task, and ``guard.release(source)`` is then up to
    it); the others are closed at once. Running out of descriptors or memory backs off,
    doubling up to 1 s; any other accept error is raised.

    With ``first_byte_timeout`` (for protocols where the client speaks first), a connection
    waits for its first bytes in a ``WaitingRoom``, without a task; one that sends nothing in
    time is closed and reported to ``on_silent(source)``."""
    if first_byte_timeout is None:
        await _accept(listener, guard, on_accept_error,
                      lambda stream, source: connections.start_soon(
                          _serve_admitted, guard, serve, stream, source))
        return

    def gone(sock: trio.socket.SocketType, source: str) -> None:
        sock.close()
        guard.release(source)

    def ready(sock: trio.socket.SocketType, source: str) -> None:
        try:
            connections.start_soon(_serve_admitted, guard, serve, trio.SocketStream(sock),
                                   source)
        except (RuntimeError, OSError):  # the server is gone (or the socket with it)
            gone(sock, source)

    def silent(sock: trio.socket.SocketType, source: str) -> None:
        gone(sock, source)
        if on_silent is not None:
            on_silent(source)

    room: WaitingRoom[trio.socket.SocketType, str] = WaitingRoom(first_byte_timeout, ready,
                                                                 silent, gone)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(room.run)
        def admitted(stream: trio.SocketStream, source: str) -> None:
            try:
                room.add(stream.socket, source)
            except OSError:  # no descriptor for the room itself: a task at once, as before
                ready(stream.socket, source)

        await _accept(listener, guard, on_accept_error, admitted)


async def _accept(listener: trio.SocketListener, guard: ListenerGuard,
                  on_accept_error: Callable[[OSError], None] | None,
                  admitted: Callable[[trio.SocketStream, str], None]) -> None:
    backoff = 0.0
    while True:
        try:
            # trio's accept retries what a pending connection error looks like (EPERM,
            # ECONNABORTED, EPROTO...) and turns a closed listener into ClosedResourceError
            accepted = await listener.accept()
        except OSError as exc:
            if exc.errno not in RESOURCE_ERRNOS:
                raise
            backoff = min(max(backoff * 2, 0.01), MAX_ACCEPT_BACKOFF)
            log.warning("%s listener: accept failed (%s), retrying in %.2fs", guard.name,
                        exc.strerror, backoff)
            if on_accept_error is not None:
                on_accept_error(exc)
            await trio.sleep(backoff)
            continue
        backoff = 0.0
        source = peer_host(accepted.socket)
        if source is None or not guard.admit(source):
            accepted.socket.close()
            continue
        admitted(accepted, source)


async def _serve_admitted(guard: ListenerGuard,
                          serve: Callable[[trio.SocketStream, str], Awaitable[bool | None]],
                          stream: trio.SocketStream, source: str) -> None:
    kept = False
    try:
        kept = bool(await serve(stream, source))
    finally:
        if not kept:
            guard.release(source)
