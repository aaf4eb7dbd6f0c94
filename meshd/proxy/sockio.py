"""TCP connections of the data plane: a trio stream over a raw non-blocking socket.

``trio.SocketStream`` yields to the scheduler on every ``send_all`` and ``receive_some``, even
when the kernel could have answered at once; on a proxy's request path that is most of the cost
(docs/performance.md, "Prototypes": raw non-blocking sockets with
``wait_readable``/``wait_writable`` gave 1.3-1.9x).
``SocketConnection`` makes the system call first and parks the task only when the call would
block.

Trio's contract that every async operation is a checkpoint is kept in the sense that matters:
each operation notices a cancellation before it does anything (``checkpoint_if_cancelled``: a
cancelled receive never loses bytes it read), and a stream whose calls keep succeeding without
waiting yields to the scheduler every ``YIELD_EVERY`` operations (shielded, after the fact), so
a connection that always has data cannot starve the others.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket

import trio

RECEIVE_SIZE = 64 * 1024
YIELD_EVERY = 16  # operations completed without waiting before a task yields anyway
_PROBE = select.poll()  # idle_unusable's, one fd at a time (registering is not a system call)


def _broken(exc: OSError) -> trio.BrokenResourceError:
    return trio.BrokenResourceError(f"socket error: {exc.strerror or exc}")


class SocketConnection(trio.abc.HalfCloseableStream):
    """A connected TCP socket as a half-closeable trio stream (one sender and one receiver
    may work at the same time). ``socket`` is the standard-library socket, non-blocking."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # a socket the peer already reset: its first use reports it
        self.socket = sock
        self._receiving = False
        self._sending = False
        self._closed = False
        self._run = 0  # operations completed in a row without waiting
        # what HTTP/1.1 keeps with an upstream connection between exchanges: its response
        # reader (``meshd.proxy.exchange``), reset rather than built again for each request
        self.response_reader: object = None

    @classmethod
    def from_trio(cls, sock: trio.socket.SocketType) -> SocketConnection:
        """Take over a trio socket (from ``accept`` or ``open_tcp_stream``)."""
        return cls(socket.socket(sock.family, sock.type, sock.proto, sock.detach()))

    async def _yield_now_and_then(self) -> None:
        """After an operation that completed without waiting: yield every ``YIELD_EVERY``
        of them (shielded: the operation has happened, so it must not look cancelled)."""
        self._run += 1
        if self._run >= YIELD_EVERY:
            self._run = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this connection")
        # A cancellation is noticed before anything is read, never after: bytes read are
        # always returned.
        await trio.lowlevel.checkpoint_if_cancelled()
        self._receiving = True
        try:
            size = max_bytes or RECEIVE_SIZE
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the connection is closed")
                try:
                    data = self.socket.recv(size)
                except BlockingIOError:
                    self._run = 0
                    await trio.lowlevel.wait_readable(self.socket)
                    continue
                except OSError as exc:
                    raise _broken(exc) from exc
                await self._yield_now_and_then()
                return data
        finally:
            self._receiving = False

    def receive_nowait(self, max_bytes: int | None = None) -> bytes | None:
        """What ``receive_some`` would return if it did not have to wait (b"" at the end of
        the stream), or None if it would wait. Not a checkpoint: for a caller that would
        otherwise set up a timeout just to wait (docs/performance.md, "The HTTP/1.1 hop")."""
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this connection")
        if self._closed:
            raise trio.ClosedResourceError("the connection is closed")
        try:
            return self.socket.recv(max_bytes or RECEIVE_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _broken(exc) from exc

    def idle_unusable(self) -> bool:
        """For a connection at rest between requests: whether something is waiting to be read
        (the peer's EOF, a reset, bytes nobody asked for). Then it cannot carry a new request:
        a server that closed it (idle timeout, drain, restart) would leave the request
        unanswered."""
        if self._closed:
            return True
        # poll(2) with no timeout rather than a MSG_PEEK recv: the same answer (EOF, bytes and
        # a reset all make the socket readable or in error) without the exception a recv that
        # would block raises, 0.7 against 1.9 µs per checkout.
        fd = self.socket.fileno()
        _PROBE.register(fd, select.POLLIN)
        try:
            return bool(_PROBE.poll(0))
        finally:
            _PROBE.unregister(fd)

    async def peek(self, size: int) -> bytes:
        """Up to ``size`` bytes the peer sent, left in place for the next receive."""
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the connection is closed")
            try:
                return self.socket.recv(size, socket.MSG_PEEK)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.socket)
            except OSError as exc:
                raise _broken(exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this connection")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._sending = True
        try:
            view = data  # a memoryview only once a send fell short (rarely: small writes)
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the connection is closed")
                try:
                    sent = self.socket.send(view) if view else 0
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise _broken(exc) from exc
                if sent == len(view):
                    break
                view = memoryview(view)[sent:]
                self._run = 0
                await trio.lowlevel.wait_writable(self.socket)
            await self._yield_now_and_then()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the connection is closed")
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this connection")
        await trio.lowlevel.checkpoint_if_cancelled()  # before the EOF goes out, never after
        if self._closed:
            raise trio.ClosedResourceError("the connection is closed")
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # the peer is gone already: nothing to half-close
                raise _broken(exc) from exc
        await trio.lowlevel.cancel_shielded_checkpoint()

    def close(self) -> None:
        """Close now (wakes any task waiting on the socket with ``ClosedResourceError``)."""
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self.socket)
        self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


def _literal_family(address: str) -> socket.AddressFamily | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


async def connect_tcp(address: str, port: int) -> SocketConnection:
    """A new TCP connection to ``address:port``; raises ``OSError``. The caller bounds the
    time. IP literals (what the registry gives) are connected directly; names go through
    trio's resolver and happy eyeballs."""
    family = _literal_family(address)
    if family is None:
        stream = await trio.open_tcp_stream(address, port)
        return SocketConnection.from_trio(stream.socket)
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        code = sock.connect_ex((address, port))
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, os.strerror(code))
        if code == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
        else:
            await trio.lowlevel.checkpoint()
    except BaseException:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        raise
    return SocketConnection(sock)
