"""The service manager's notification protocol (``sd_notify``) and its watchdog, without
libsystemd.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET``: the path of an ``AF_UNIX`` datagram
socket (or, starting with ``@``, a name in the abstract namespace). Each datagram is a few
``KEY=VALUE`` lines: ``READY=1`` once the service is up (``systemctl start`` returns then),
``STATUS=...`` for ``systemctl status``, ``RELOADING=1``/``STOPPING=1`` around a reload or a stop,
and ``WATCHDOG=1`` at least once per ``WatchdogSec=`` (passed as ``WATCHDOG_USEC``), or systemd
kills and restarts the service. Outside systemd ``NOTIFY_SOCKET`` is unset and every call here is
a no-op, so the daemons call these unconditionally.

Formatting the message (``format_message``) and reading the environment (``notify_address``,
``watchdog_interval``) are pure; ``notify`` is the one place that touches a socket.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

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
