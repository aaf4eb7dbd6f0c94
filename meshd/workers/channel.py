"""The supervisor's line to one worker process: framed messages over a Unix socket pair, with
file descriptors (listening sockets) passed alongside (``SCM_RIGHTS``).

A frame is a 4-byte length and a pickled message. Both ends are this host's meshd processes,
made by the supervisor with ``socket.socketpair()`` and never reachable by anyone else, so a
pickle is as trusted as the process itself. A message that carries descriptors says how many
(``fds``); they arrive with its first byte and are handed out with it, in order."""

from __future__ import annotations

import array
import pickle
import socket
import struct
from collections import deque
from typing import Any

import trio

MAX_FRAME = 64 * 1024 * 1024  # a frame larger than this is a broken peer, not a message
MAX_FDS = 253  # the kernel's limit of descriptors in one message (SCM_MAX_FD)
_HEADER = struct.Struct("!I")


class ChannelClosed(Exception):
    """The other process closed its end (it ended) or sent what is not a frame."""


class Channel:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._fds: deque[int] = deque()  # received, not handed out yet
        self._send_lock = trio.Lock()

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        return cls(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))

    async def send(self, message: Any, fds: list[int] | None = None) -> None:
        """Send ``message`` (and ``fds`` with it). Raises ``ChannelClosed``."""
        frame = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        data = memoryview(_HEADER.pack(len(frame)) + frame)
        async with self._send_lock:
            try:
                if fds:
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", fds).tobytes())]
                    sent = await self._sock.sendmsg([data], ancillary)
                    data = data[sent:]
                while data:
                    sent = await self._sock.send(data)
                    data = data[sent:]
            except OSError as exc:
                raise ChannelClosed(f"cannot send: {exc}") from exc

    async def receive(self) -> tuple[Any, list[int]]:
        """The next message and the descriptors it carries. Raises ``ChannelClosed``."""
        while True:
            if len(self._buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buffer)
                if size > MAX_FRAME:
                    raise ChannelClosed(f"a frame of {size} bytes")
                if len(self._buffer) >= _HEADER.size + size:
                    frame = bytes(self._buffer[_HEADER.size:_HEADER.size + size])
                    del self._buffer[:_HEADER.size + size]
                    message = pickle.loads(frame)
                    count = int(getattr(message, "fds", 0))
                    if count > len(self._fds):
                        raise ChannelClosed("a message without the descriptors it names")
                    return message, [self._fds.popleft() for _ in range(count)]
            try:
                data, ancillary, _flags, _addr = await self._sock.recvmsg(
                    65536, socket.CMSG_SPACE(MAX_FDS * 4))
            except OSError as exc:
                raise ChannelClosed(f"cannot receive: {exc}") from exc
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
            if not data:
                raise ChannelClosed("the other process closed the channel")
            self._buffer += data

    def close(self) -> None:
        for fd in self._fds:
            try:
                socket.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._sock.close()
