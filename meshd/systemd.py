"""The service manager's notification protocol (``sd_notify``) and its watchdog, without
libsystemd.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET``: the path of an ``AF_UNIX`` datagram
socket (or, starting with ``@``, a name in the abstract namespace). Each datagram is a few
``KEY=VALUE`` lines: ``READY=1`` once the service is up (``systemctl start`` returns then),
``STATUS=...`` for ``systemctl status``, ``RELOADING=1``/``STOPPING=1`` around a reload or a stop,
and ``WATCHDOG=1`` at least once per ``WatchdogSec=`` (passed as ``WATCHDOG_USEC``), or systemd
kills and restarts the service. Outside systemd ``NOTIFY_SOCKET`` is unset and every call here is
a no-op, so the daemons call these unconditionally.

The same socket keeps file descriptors for the service (its fd store, when the unit sets
``FileDescriptorStoreMax=``; systemd 254 and later say so with ``FDSTORE=<max>``): a datagram with
``FDSTORE=1``, ``FDNAME=<name>`` and the descriptors attached (``SCM_RIGHTS``). systemd hands them
back to the next process of the service through ``LISTEN_FDS`` (``meshd.listen_fds``), so the
listening sockets outlive a restart and connections queue in the kernel meanwhile.

Formatting the message (``format_message``) and reading the environment (``notify_address``,
``watchdog_interval``, ``fd_store_size``) are pure; ``notify`` and ``send_fds`` are the places
that touch a socket.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence

import trio

log = logging.getLogger(__name__)

# systemd reads at most this much of one datagram; a longer STATUS is cut, never split
MAX_STATUS = 512


def format_message(
    *, ready: bool = False, reloading: bool = False, stopping: bool = False,
    watchdog: bool = False, status: str | None = None, monotonic_usec: int | None = None,
) -> bytes:
    """The datagram for one notification: newline-separated ``KEY=VALUE`` assignments.

    ``STATUS`` is one line (newlines would start a new assignment), shortened to
    ``MAX_STATUS`` characters. ``RELOADING=1`` carries ``MONOTONIC_USEC``, which systemd 253+
    uses to tell this reload from an older one."""
    lines: list[str] = []
    if reloading:
        lines.append("RELOADING=1")
        if monotonic_usec is not None:
            lines.append(f"MONOTONIC_USEC={monotonic_usec}")
    if ready:
        lines.append("READY=1")
    if stopping:
        lines.append("STOPPING=1")
    if watchdog:
        lines.append("WATCHDOG=1")
    if status is not None:
        one_line = " ".join(status.split())
        lines.append(f"STATUS={one_line[:MAX_STATUS]}")
    return "\n".join(lines).encode("utf-8", "replace")


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The socket address ``NOTIFY_SOCKET`` names, in the form ``socket.sendto`` takes: a
    filesystem path, or ``"\\0name"`` for ``@name`` (Linux abstract namespace). None when unset
    or not a form this module speaks (``vsock:`` addresses are for VMs talking to their host)."""
    value = environ.get("NOTIFY_SOCKET", "")
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between the pings systemd expects at the latest (``WATCHDOG_USEC``), or None
    when no watchdog is asked of this process: unset, malformed, zero, or addressed to another
    process (``WATCHDOG_PID`` names the main process; a child that inherits it must not ping)."""
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    raw = environ.get("WATCHDOG_USEC", "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    return int(raw) / 1_000_000


def notify(
    *, ready: bool = False, reloading: bool = False, stopping: bool = False,
    watchdog: bool = False, status: str | None = None,
) -> bool:
    """Send one notification to the service manager; True if a datagram was sent.

    Never blocks and never raises: a service must not fail, or stall its event loop, because
    its supervisor's socket is gone or full. Without ``NOTIFY_SOCKET`` this does nothing."""
    address = notify_address(os.environ)
    if address is None:
        return False
    message = format_message(
        ready=ready, reloading=reloading, stopping=stopping, watchdog=watchdog, status=status,
        monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000 if reloading
        else None,
    )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(message, address)
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def fd_store_size(environ: Mapping[str, str]) -> int:
    """How many descriptors the service manager keeps for us (``FDSTORE``, set by systemd 254+
    when the unit has ``FileDescriptorStoreMax=``); 0 without a notify socket or a store."""
    raw = environ.get("FDSTORE", "")
    if notify_address(environ) is None or not raw.isdigit():
        return 0
    return int(raw)


def fd_store_message(name: str, *, remove: bool = False) -> bytes:
    """The datagram that stores (``FDSTORE=1``) the attached descriptors under ``name``, or
    removes (``FDSTOREREMOVE=1``) every stored one of that name. ``FDPOLL=0``: a listening
    socket is not to be dropped for what poll() reports on it."""
    if remove:
        return f"FDSTOREREMOVE=1\nFDNAME={name}".encode()
    return f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0".encode()


def send_fds(name: str, fds: Sequence[int], *, remove: bool = False) -> bool:
    """Store ``fds`` in the service manager's fd store under ``name`` (or, with ``remove``,
    drop what is stored under it); True if the datagram was sent. Never raises."""
    address = notify_address(os.environ)
    if address is None:
        return False
    ancillary = ([] if remove else
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendmsg([fd_store_message(name, remove=remove)], ancillary, 0, address)
    except OSError as exc:
        log.warning("cannot %s %s in the service manager's fd store: %s",
                    "remove" if remove else "keep", name, exc)
        return False
    return True


async def watchdog_task(
    interval: float | None = None,
    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping the watchdog at half its interval for as long as the event loop runs (a wedged
    loop stops the pings, and systemd restarts the service). Returns at once when no watchdog
    is configured. ``interval`` overrides the environment (for tests)."""
    if interval is None:
        interval = watchdog_interval(os.environ, os.getpid())
    task_status.started()
    if interval is None:
        return
    log.debug("systemd watchdog: pinging every %.3fs", interval / 2)
    while True:
        notify(watchdog=True)
        await trio.sleep(interval / 2)
