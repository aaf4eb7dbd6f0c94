"""In-place upgrade of ``meshd run`` outside systemd: the running daemon hands its listening
sockets to a new process started with the same configuration, and leaves once that one is ready.

    old meshd (ready)                           new meshd (same meshd.toml, new code)
      serves <state_dir>/handover.sock  <────── connects (a live socket there: a predecessor)
                                                 TAKE {node, pid}
      SOCKETS {pid, sockets[name, host, port]} ──>  + the descriptors (SCM_RIGHTS)
      keeps serving meanwhile                     starts on them: both accept now
                                                  joins, watches, registers, becomes ready
                                          <────── FINISH
      FINISHING {drain_timeout} ─────────────────> takes handover.sock over (for the next one)
      stops accepting (closes its own fds only),
      stops health reports WITHOUT deregistering
      (the service IDs are the new process's now),
      drains up to drain_timeout, exits

Failure cases, and what this module chooses:
- the new process dies or is stopped before it is ready: the connection closes without FINISH
  and the old one keeps serving as before (it never stopped; it logs that the handover was
  abandoned);
- a stale ``handover.sock`` (its process is gone: connecting is refused): the new process removes
  it and starts normally, binding its own sockets;
- two new processes at once: the old serves one handover at a time; the second is refused with
  the first one's pid, and exits (it could not bind the ports either);
- another user's socket, or a socket for another node name: refused (``SO_PEERCRED`` uid on both
  sides; the socket file is 0600 in the 0700 state directory anyway).

The messages are JSON objects, one per ``SOCK_SEQPACKET`` datagram (so no framing of our own, and
descriptors ride with the message they belong to); ``encode``/``decode`` are pure.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from meshd.config.schema import HostConfig
from meshd.errors import MeshError
from meshd.listen_fds import InheritedSockets

log = logging.getLogger(__name__)

SOCKET_NAME = "handover.sock"
MAX_MESSAGE = 64 * 1024
MAX_SOCKETS = 256
EXCHANGE_TIMEOUT = 10.0  # one message each way, between two processes on one host
# AF_UNIX paths are at most 107 bytes (108 with the NUL)
MAX_PATH = 107

TAKE, SOCKETS, REFUSED, FINISH, FINISHING = "take", "sockets", "refused", "finish", "finishing"
KINDS = (TAKE, SOCKETS, REFUSED, FINISH, FINISHING)


class HandoverError(MeshError):
    """A handover that cannot go on (refused, broken, malformed)."""


@dataclass(frozen=True)
class SocketEntry:
    """A listening socket in a SOCKETS message: its name and the address it is bound to."""

    name: str
    host: str
    port: int


def encode(kind: str, **fields: Any) -> bytes:
    """One message: ``{"type": kind, ...fields}`` as compact JSON."""
    if kind not in KINDS:
        raise ValueError(f"unknown handover message type {kind!r}")
    data = json.dumps({"type": kind, **fields}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"handover message of {len(data)} bytes is over {MAX_MESSAGE}")
    return data


def decode(data: bytes, expected: Sequence[str]) -> dict[str, Any]:
    """The message in ``data`` when its type is one of ``expected``; HandoverError otherwise
    (an empty datagram is the other side closing)."""
    if not data:
        raise HandoverError("the other process closed the handover connection")
    if len(data) > MAX_MESSAGE:
        raise HandoverError(f"handover message of {len(data)} bytes is over {MAX_MESSAGE}")
    try:
        message = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HandoverError(f"malformed handover message: {exc}") from exc
    if not isinstance(message, dict) or message.get("type") not in KINDS:
        raise HandoverError(f"malformed handover message: {data[:80]!r}")
    if message["type"] == REFUSED and REFUSED not in expected:
        raise HandoverError(f"refused: {message.get('reason', '(no reason given)')}")
    if message["type"] not in expected:
        raise HandoverError(f"expected a {' or '.join(expected)} message, got "
                            f"{message['type']}")
    return message


def socket_entries(message: Mapping[str, Any], fds: int) -> list[SocketEntry]:
    """The sockets a SOCKETS message lists, checked against the number of descriptors that came
    with it (one each, in order)."""
    raw = message.get("sockets")
    if not isinstance(raw, list) or len(raw) > MAX_SOCKETS:
        raise HandoverError("malformed handover message: sockets must be a list")
    entries = []
    for item in raw:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                and isinstance(item.get("host"), str) and isinstance(item.get("port"), int)
                and not isinstance(item.get("port"), bool)):
            raise HandoverError(f"malformed socket entry in a handover message: {item!r}")
        entries.append(SocketEntry(item["name"], item["host"], item["port"]))
    if len(entries) != fds:
        raise HandoverError(f"the handover message lists {len(entries)} socket(s) but "
                            f"{fds} descriptor(s) came with it")
    return entries


def handover_path(config: HostConfig) -> Path:
    return config.state_dir / SOCKET_NAME


def _usable(path: Path) -> bool:
    if len(os.fsencode(path)) > MAX_PATH:
        log.warning("in-place upgrade disabled: %s is longer than a unix socket path may be "
                    "(%d bytes); use a shorter state_dir", path, MAX_PATH)
        return False
    return True


def _peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _peer_pid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[0])


async def _receive(sock: trio.socket.SocketType, expected: Sequence[str],
                   max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    ancillary = socket.CMSG_SPACE(max_fds * array.array("i").itemsize) if max_fds else 0
    data, ancdata, flags, _addr = await sock.recvmsg(MAX_MESSAGE + 1, ancillary)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
    try:
        if flags & socket.MSG_CTRUNC:
            raise HandoverError("the descriptors of a handover message were cut")
        return decode(data, expected), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


async def _send(sock: trio.socket.SocketType, data: bytes, fds: Sequence[int] = ()) -> None:
    ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                 if fds else [])
    await sock.sendmsg([data], ancillary)


# -- the new process ---------------------------------------------------------------------------

class Successor:
    """The new process's end of a handover: the sockets it received, and the connection on
    which it tells the old process to finish once it is ready."""

    def __init__(self, sock: trio.socket.SocketType, sockets: InheritedSockets,
                 predecessor: int) -> None:
        self._sock = sock
        self.sockets = sockets
        self.predecessor = predecessor

    async def finish(self) -> None:
        """Tell the old process to stop accepting and drain; returns once it has said it
        does (or after a bounded wait: it may have been stopped meanwhile)."""
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT):
                await _send(self._sock, encode(FINISH, pid=os.getpid()))
                answer, _ = await _receive(self._sock, (FINISHING,))
            log.info("handover: the previous meshd (pid %d) stopped accepting and drains for "
                     "up to %gs; this process serves alone now", self.predecessor,
                     float(answer.get("drain_timeout", 0)))
        except (OSError, HandoverError, trio.TooSlowError) as exc:
            log.warning("handover: the previous meshd (pid %d) did not confirm it finishes "
                        "(%s); it may still be running", self.predecessor, exc)
        finally:
            self._sock.close()

    def close(self) -> None:
        """Give up before finishing (the old process keeps serving) and close the sockets."""
        self._sock.close()
        self.sockets.close_unclaimed()


async def take_over(config: HostConfig) -> Successor | None:
    """Take the listening sockets of a meshd running with this configuration, if one is: None
    when there is none (no socket, or a stale one, which is removed). HandoverError when a live
    one refuses."""
    path = handover_path(config)
    if not path.exists() or not _usable(path):
        return None
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        try:
            await sock.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("handover: %s is stale (no meshd behind it): removed, starting on "
                     "sockets of our own", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock.close()
            return None
        if _peer_uid(sock) != os.getuid():
            raise HandoverError(f"{path} belongs to a process of another user")
        predecessor = _peer_pid(sock)
        log.info("handover: a meshd runs with this configuration (pid %d): taking over its "
                 "listening sockets through %s", predecessor, path)
        with trio.fail_after(EXCHANGE_TIMEOUT):
            await _send(sock, encode(TAKE, node=config.node, pid=os.getpid()))
            message, fds = await _receive(sock, (SOCKETS,), MAX_SOCKETS)
        try:
            entries = socket_entries(message, len(fds))
        except HandoverError:
            for fd in fds:
                os.close(fd)
            raise
        received = [(e.name, socket.socket(fileno=fd)) for e, fd in zip(entries, fds, strict=True)]
        for entry in entries:
            log.info("handover: received %s (%s:%d) from pid %d", entry.name, entry.host,
                     entry.port, predecessor)
        return Successor(sock, InheritedSockets(received, f"handover from pid {predecessor}"),
                         predecessor)
    except (OSError, trio.TooSlowError) as exc:
        sock.close()
        raise HandoverError(f"handover through {path} failed: {exc}") from exc
    except BaseException:
        sock.close()
        raise


# -- the running process -----------------------------------------------------------------------

Listening = Callable[[], list[tuple[str, trio.socket.SocketType]]]


async def serve(
    config: HostConfig, listening: Listening, finish: Callable[[], Awaitable[None]],
    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Offer this daemon's listening sockets (``listening()``: name and socket) to a successor
    at ``<state_dir>/handover.sock``, one handover at a time, until cancelled or until a
    successor is ready: then ``finish()`` (stop without deregistering) is awaited."""
    path = handover_path(config)
    if not _usable(path):
        task_status.started()
        return
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # bound under a temporary name and renamed over the path: a successor's socket replaces
    # its predecessor's at once, and nobody ever connects to a half-made one
    temporary = path.with_name(f".{SOCKET_NAME}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    try:
        old_umask = os.umask(0o177)
        try:
            await listener.bind(os.fspath(temporary))
        finally:
            os.umask(old_umask)
        os.chmod(temporary, 0o600)
        listener.listen(4)
        os.replace(temporary, path)
        mine = path.stat()
    except OSError as exc:
        listener.close()
        log.warning("in-place upgrade disabled: cannot serve %s: %s", path, exc)
        task_status.started()
        return
    busy: list[int] = []  # the pid of the successor in the middle of a handover, if any
    done = trio.Event()

    async def one(conn: trio.socket.SocketType) -> None:
        with conn:
            pid = _peer_pid(conn)
            try:
                with trio.fail_after(EXCHANGE_TIMEOUT):
                    request, _ = await _receive(conn, (TAKE,))
                if _peer_uid(conn) != os.getuid():
                    raise HandoverError("a process of another user asked for the sockets")
                if request.get("node") != config.node:
                    raise HandoverError(f"node {request.get('node')!r} asked for the sockets "
                                        f"of node {config.node!r}")
                if busy:
                    raise HandoverError(f"a handover to pid {busy[0]} is under way")
            except (HandoverError, trio.TooSlowError, OSError) as exc:
                log.warning("handover: refused pid %d: %s", pid, exc)
                with contextlib.suppress(OSError, ValueError):
                    await _send(conn, encode(REFUSED, reason=str(exc)))
                return
            busy.append(pid)
            try:
                named = listening()
                entries = [{"name": name, "host": str(s.getsockname()[0]),
                            "port": int(s.getsockname()[1])} for name, s in named]
                await _send(conn, encode(SOCKETS, pid=os.getpid(), sockets=entries),
                            [s.fileno() for _, s in named])
                log.info("handover: gave %d listening socket(s) to pid %d; serving on until "
                         "it is ready", len(named), pid)
                try:
                    await _receive(conn, (FINISH,))
                except (HandoverError, OSError) as exc:
                    log.warning("handover to pid %d abandoned before it was ready (%s); this "
                                "meshd keeps serving", pid, exc)
                    return
                log.info("handover: pid %d is ready; stopping accepting, draining for up to "
                         "%gs without deregistering", pid, config.drain_timeout)
                # gone before the successor hears FINISHING, so it never has its own file
                # removed by us
                stop_offering()
                with contextlib.suppress(OSError):
                    await _send(conn, encode(FINISHING, drain_timeout=config.drain_timeout))
                done.set()
            finally:
                busy.clear()

    def stop_offering() -> None:
        listener.close()
        _unlink_if_mine(path, mine)

    try:
        async with trio.open_nursery() as nursery:
            task_status.started()

            async def accept() -> None:
                while True:
                    try:
                        conn, _ = await listener.accept()
                    except trio.ClosedResourceError:
                        return  # closed by stop_offering
                    except OSError as exc:
                        log.warning("in-place upgrade disabled from now on: accepting on %s "
                                    "failed: %s", path, exc)
                        return
                    nursery.start_soon(one, conn)

            nursery.start_soon(accept)
            await done.wait()
            nursery.cancel_scope.cancel()
    finally:
        stop_offering()
    await finish()


def _unlink_if_mine(path: Path, mine: os.stat_result) -> None:
    """Remove the socket file unless a successor has put its own there."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
