"""Listening sockets that outlive one meshd process.

A restart must not refuse a single connection, so the listening sockets are made by something
that lives longer than the daemon and handed to each new process: systemd (its file descriptor
store, or a socket unit), ``meshd up`` (its runner binds them), or the running meshd itself during
an in-place upgrade (``meshd.daemon.handover``). While no process accepts, the kernel keeps
queueing connections on the socket; a new process picks them up where the old one left off.

The handing over follows systemd's ``sd_listen_fds`` protocol: ``LISTEN_PID`` (the process meant,
so a child that inherits the environment does not take them), ``LISTEN_FDS`` (how many, at file
descriptors 3, 4, ...) and ``LISTEN_FDNAMES`` (colon-separated names). ``parse_listen_fds`` reads
that (pure); ``InheritedSockets`` owns the sockets until a listener claims one by its address
(``take``) and closes what nobody claimed. A listening socket is only ever closed here, never
``shutdown()``: another holder (the runner, the fd store, the other process of a handover) keeps it
listening with its queue of connections.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass

from meshd.config.schema import HostConfig

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
UNKNOWN_NAME = "unknown"  # systemd's name for a descriptor passed without one


@dataclass(frozen=True)
class ListenAddress:
    """One listening socket a meshd needs: what it is for (``name``, also its name in the fd
    store and in ``LISTEN_FDNAMES``) and where it listens."""

    name: str
    host: str
    port: int


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """``(fd, name)`` of each descriptor passed to process ``pid`` by the ``sd_listen_fds``
    variables in ``environ``; empty when they are absent, malformed or meant for another
    process. A name list that does not match the count is ignored (every name ``unknown``), as
    ``sd_listen_fds_with_names`` does."""
    if environ.get("LISTEN_PID", "") != str(pid):
        return []
    raw = environ.get("LISTEN_FDS", "")
    if not raw.isdigit() or int(raw) == 0:
        return []
    count = int(raw)
    names = environ.get("LISTEN_FDNAMES", "").split(":") if "LISTEN_FDNAMES" in environ else []
    if len(names) != count:
        names = [UNKNOWN_NAME] * count
    return [(LISTEN_FDS_START + i, names[i] or UNKNOWN_NAME) for i in range(count)]


def same_address(bound: tuple[str, int], host: str, port: int) -> bool:
    """Whether a socket bound to ``bound`` (``getsockname()``'s first two fields) is the one
    configured as ``host:port``. IP addresses are compared as addresses (``::ffff:127.0.0.1``
    is not ``127.0.0.1``: another socket); port 0 never matches (the kernel picks one)."""
    if port == 0 or bound[1] != port:
        return False
    try:
        return ipaddress.ip_address(bound[0]) == ipaddress.ip_address(host)
    except ValueError:
        return bound[0] == host


def fd_name(role: str, host: str, port: int) -> str:
    """A descriptor's name in the fd store: role and address, unique per address (systemd
    allows printable ASCII without ``:`` in a name, so an IPv6 address's colons become dots)."""
    return f"{role}-{host.replace(':', '.')}-{port}"


def host_listen_addresses(config: HostConfig) -> list[ListenAddress]:
    """Every listening socket ``meshd run`` opens for ``config``: the inbound listener, one
    outbound listener per upstream, the egress proxy listener and the admin API. (What
    ``meshd up`` binds for a child and what a daemon offers the fd store: one list, so they
    cannot disagree.)"""
    found = [ListenAddress(fd_name("inbound", config.address, config.inbound_port),
                           config.address, config.inbound_port)]
    for _service, upstream in config.upstreams:
        found.append(ListenAddress(
            fd_name("outbound", config.outbound_address, upstream.local_port),
            config.outbound_address, upstream.local_port))
    if config.egress_port:  # the egress proxy listener, beside the outbound ones
        found.append(ListenAddress(
            fd_name("outbound", config.outbound_address, config.egress_port),
            config.outbound_address, config.egress_port))
    if config.admin_port:
        found.append(ListenAddress(fd_name("admin", config.admin_host, config.admin_port),
                                   config.admin_host, config.admin_port))
    return found


def bind_listener(address: ListenAddress, backlog: int = socket.SOMAXCONN) -> socket.socket:
    """A TCP socket listening on ``address`` (``SO_REUSEADDR``, as trio's listeners), not
    inheritable until it is passed on explicitly. Raises OSError."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class InheritedSockets:
    """Listening sockets handed to this process, each with its name, until claimed.

    ``take(host, port)`` gives a listener the socket bound to its configured address (the
    caller owns it then); ``close_unclaimed`` closes the rest with a log line each (a listener
    removed from meshd.toml since the sockets were made). ``adopted`` lists what was claimed."""

    def __init__(self, sockets: Iterable[tuple[str, socket.socket]] = (),
                 source: str = "") -> None:
        self.source = source  # where they came from, for logs ("LISTEN_FDS", "handover")
        self._free: list[tuple[str, socket.socket]] = list(sockets)
        self.adopted: list[tuple[str, socket.socket]] = []

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None,
                         pid: int | None = None) -> InheritedSockets:
        """The sockets ``LISTEN_FDS`` passes to this process. The variables are removed from
        the environment either way, so no child process of ours takes them for its own. A
        descriptor that is not a listening TCP socket is closed with a warning."""
        env = os.environ if environ is None else environ
        passed = parse_listen_fds(env, os.getpid() if pid is None else pid)
        for key in LISTEN_ENV:
            env.pop(key, None)
        sockets: list[tuple[str, socket.socket]] = []
        for fd, name in passed:
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                log.warning("LISTEN_FDS: descriptor %d (%s) is not a socket (%s); ignored",
                            fd, name, exc.strerror or exc)
                continue
            os.set_inheritable(fd, False)
            if not _is_tcp_listener(sock):
                log.warning("LISTEN_FDS: descriptor %d (%s) is not a listening TCP socket; "
                            "closed", fd, name)
                sock.close()
                continue
            sockets.append((name, sock))
        return cls(sockets, "LISTEN_FDS")

    def __len__(self) -> int:
        return len(self._free) + len(self.adopted)

    def take(self, host: str, port: int) -> socket.socket | None:
        for i, (name, sock) in enumerate(self._free):
            try:
                bound = sock.getsockname()
            except OSError:
                continue
            if same_address(bound, host, port):
                del self._free[i]
                self.adopted.append((name, sock))
                log.info("listening on %s:%d with the socket inherited through %s (%s)",
                         host, port, self.source, name)
                return sock
        return None

    def close_unclaimed(self) -> list[str]:
        """Close every socket no listener claimed; their names."""
        names = []
        for name, sock in self._free:
            try:
                host, port = sock.getsockname()[:2]
                where = f"{host}:{port}"
            except OSError:
                where = "?"
            log.warning("inherited listening socket %s on %s (through %s) matches no listener "
                        "in the configuration: closed", name, where, self.source)
            sock.close()
            names.append(name)
        self._free = []
        return names


def _is_tcp_listener(sock: socket.socket) -> bool:
    try:
        return (sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.type == socket.SOCK_STREAM
                and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)))
    except OSError:
        return False
