"""The waiting room: accepted connections with nothing to read yet, held without a task.

A trio task per connection costs a few KB and a dozen objects the garbage collector walks on
every full collection (the task, its coroutine frames, a cancel scope for its deadline). For a
connection that may never send anything (a flood, a scanner, a half-dead client) that is the
whole cost, and thousands of them make each full collection a stall of 100 ms or more for every
other connection. So a listener parks such connections here: one selector (epoll on Linux,
kqueue on macOS) that trio waits on as a single file descriptor, a dict entry per connection
and one deadline queue (every stay has the same timeout, so arrival order is deadline order).
A connection gets its task once its first bytes arrive; one that sends nothing within the
timeout is handed to ``on_timeout``, and one that goes away first (EOF, reset) to ``on_gone``:
neither ever costs a task (when a flood ends, thousands of them close at once).

Two kinds of waits use it: a new connection waiting for its first bytes (``meshd.conns.guard``,
the mTLS and gateway listeners), and an HTTP/1.1 keep-alive connection idle between requests
(``meshd.proxy.server``: its serving task ends when it parks, and a fresh one serves its next
request; when the room closes, ``on_close`` closes them).
"""

from __future__ import annotations

import selectors
import socket
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import trio


class _Pollable(Protocol):
    def fileno(self) -> int: ...


S = TypeVar("S", bound=_Pollable)  # a trio socket, or a standard-library one
T = TypeVar("T")


class WaitingRoom(Generic[S, T]):
    """Sockets ``S`` waiting for bytes to read, each with a payload ``T`` (what its task
    needs)."""

    def __init__(self, timeout: float, ready: Callable[[S, T], None],
                 on_timeout: Callable[[S, T], None], on_gone: Callable[[S, T], None], *,
                 on_close: Callable[[S, T], None] | None = None) -> None:
        self.timeout = timeout
        self._ready = ready
        self._on_close = on_close or ready  # who takes those still here when ``run`` ends
        self._on_timeout = on_timeout
        self._on_gone = on_gone
        # made with the first connection: a listener that never gets one spends no descriptor
        self._selector: selectors.BaseSelector | None = None
        self._opened = trio.Event()
        self.closed = False  # ``run`` has ended: nothing can wait here any more
        # by descriptor: the socket, its payload and the number of its stay (a keep-alive
        # connection comes back on the same socket: only its latest stay's deadline counts)
        self._waiting: dict[int, tuple[S, T, int]] = {}
        self._deadlines: deque[tuple[float, int, int]] = deque()
        self._stays = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, sock: S, payload: T) -> None:
        """Park a connection; raises ``OSError`` when the room cannot be made (no descriptor
        left for its selector) or is closed: then the caller gives the connection its task at
        once."""
        if self.closed:
            raise OSError("the waiting room is closed")
        if self._selector is None:
            selector = selectors.DefaultSelector()
            if not hasattr(selector, "fileno"):  # select()/poll(): nothing trio can wait on
                selector.close()
                raise OSError("no selector with a file descriptor on this platform")
            self._selector = selector
            self._opened.set()
        fd = sock.fileno()
        self._selector.register(fd, selectors.EVENT_READ)
        self._stays += 1
        self._waiting[fd] = (sock, payload, self._stays)
        self._deadlines.append((trio.current_time() + self.timeout, fd, self._stays))

    async def run(self) -> None:
        """Hand over connections as they become readable or time out, until cancelled (a
        drain). Then every connection still waiting goes to ``on_close``; by default it gets
        its task like a readable one: its first bytes may be on the way, and its task's own
        deadlines (or the drain's) end it."""
        try:
            await self._opened.wait()
            selector = self._selector
            assert selector is not None
            while True:
                deadline = self._deadlines[0][0] if self._deadlines else float("inf")
                with trio.move_on_at(deadline):
                    await trio.lowlevel.wait_readable(selector.fileno())  # type: ignore[attr-defined]
                for key, _ in selector.select(0):
                    self._hand_over(key.fd, self._on_gone if _gone(key.fd) else self._ready)
                self._expire(trio.current_time())
        finally:
            self.closed = True
            for fd in list(self._waiting):
                self._hand_over(fd, self._on_close)
            self._deadlines.clear()
            if self._selector is not None:
                self._selector.close()

    def _hand_over(self, fd: int, to: Callable[[S, T], None]) -> None:
        assert self._selector is not None
        self._selector.unregister(fd)
        sock, payload, _ = self._waiting.pop(fd)
        to(sock, payload)

    def _expire(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, fd, stay = deadlines.popleft()
            entry = self._waiting.get(fd)
            if entry is not None and entry[2] == stay:  # (not a later stay on the same fd)
                self._hand_over(fd, self._on_timeout)
        # entries handed over early stay in the queue until their deadline: drop them in
        # bulk when they are most of it, so a busy listener's queue stays small
        if len(deadlines) > 2 * len(self._waiting) + 1024:
            self._deadlines = deque(d for d in deadlines
                                    if self._waiting.get(d[1], (None, None, 0))[2] == d[2])


def _gone(fd: int) -> bool:
    """Whether a readable socket holds its peer's EOF (or an error) rather than bytes: peeked
    through a socket object lent the descriptor (detached again, never closed: no descriptor
    is spent, so running out of them cannot fail this). When in doubt, not gone: its task
    reads and finds out."""
    try:
        probe = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        probe.detach()
