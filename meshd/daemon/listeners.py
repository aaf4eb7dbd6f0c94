"""What the daemon does with its listening sockets once they accept, so that they outlive it:
inherited ones nobody claimed are closed (and dropped from systemd's fd store), the ones it bound
itself go into the fd store when systemd offers one (``meshd.systemd``), and ``named`` lists them
all for a handover (``meshd.daemon.handover``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import trio

from meshd import systemd
from meshd.listen_fds import InheritedSockets, fd_name

log = logging.getLogger(__name__)


def named(sockets: Sequence[tuple[str, trio.socket.SocketType]]
          ) -> list[tuple[str, trio.socket.SocketType]]:
    """``(role, socket)`` -> ``(name, socket)``, the name saying role and address."""
    out = []
    for role, sock in sockets:
        host, port = sock.getsockname()[:2]
        out.append((fd_name(role, str(host), int(port)), sock))
    return out


def settle(inherited: InheritedSockets,
           sockets: Sequence[tuple[str, trio.socket.SocketType]]) -> None:
    """Close the inherited sockets no listener claimed, then keep the sockets this process
    bound itself in systemd's fd store (when it offers one), so the next start gets them."""
    unclaimed = inherited.close_unclaimed()
    store = systemd.fd_store_size(os.environ)
    if not store:
        return
    for name in unclaimed:
        systemd.send_fds(name, [], remove=True)
    adopted = {sock.fileno() for _, sock in inherited.adopted}
    fresh = [(name, sock) for name, sock in named(sockets) if sock.fileno() not in adopted]
    if len(fresh) + len(inherited.adopted) > store:
        log.warning("the unit keeps %d descriptor(s) (FileDescriptorStoreMax=) but meshd listens "
                    "on %d sockets: a restart refuses connections on those that do not fit",
                    store, len(sockets))
    stored = [name for name, sock in fresh if systemd.send_fds(name, [sock.fileno()])]
    if stored:
        log.info("kept %d listening socket(s) in the service manager's fd store for the next "
                 "start: %s", len(stored), ", ".join(stored))


def keep(role: str, sockets: Sequence[trio.socket.SocketType]) -> None:
    """A listener opened while running (a reload) goes into the fd store too, when offered."""
    if not systemd.fd_store_size(os.environ):
        return
    for name, sock in named([(role, sock) for sock in sockets]):
        systemd.send_fds(name, [sock.fileno()])


def forget(role: str, addresses: Sequence[tuple[str, int]]) -> None:
    """A listener closed while running leaves the fd store: the next start does not get it."""
    if not systemd.fd_store_size(os.environ):
        return
    for host, port in addresses:
        systemd.send_fds(fd_name(role, host, port), [], remove=True)
