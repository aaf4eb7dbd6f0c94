"""Connection floods against real processes, for the connection-limit tests: idle connections
that never send a byte, opened from several loopback source addresses, a side client timed
meanwhile, and what the kernel says about the server process (RSS, open file limit).
(``pyproject.toml`` puts ``tests/`` on ``sys.path``.)"""

from __future__ import annotations

import errno
import resource
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

MB = 1024 * 1024
OPEN_BATCH = 50  # connects started before waiting for them (small: the side client shares the loop)
FD_SPARE = 512


def raise_own_fd_limit(connections: int) -> None:
    """This test process holds the client side of every idle connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + FD_SPARE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            raise AssertionError(f"the hard open file limit ({hard}) is below {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def low_fd_limit() -> None:
    """``preexec_fn`` of a child started with the usual soft limit of 1024 (the hard one kept),
    which the daemon must raise itself."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))


def soft_fd_limit(pid: int) -> tuple[int, int]:
    """The soft and hard "Max open files" of a process, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open file limit in /proc/{pid}/limits")


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


async def open_idle(address: tuple[str, int], sources: Sequence[str], count: int,
                    limit: float = 30.0) -> list[socket.socket]:
    """``count`` connections to ``address``, spread evenly over ``sources`` (loopback addresses
    to bind), connected and sending nothing. Bounded by ``limit`` seconds."""
    socks: list[socket.socket] = []
    try:
        with trio.fail_after(limit):
            for start in range(0, count, OPEN_BATCH):
                batch = []
                for i in range(start, min(count, start + OPEN_BATCH)):
                    sock = socket.socket()
                    socks.append(sock)
                    sock.setblocking(False)
                    sock.bind((sources[i % len(sources)], 0))
                    code = sock.connect_ex(address)
                    if code not in (0, errno.EINPROGRESS):
                        raise OSError(code, f"connect from {sources[i % len(sources)]}")
                    batch.append(sock)
                for sock in batch:
                    await trio.lowlevel.wait_writable(sock)
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise OSError(code, "connect failed")
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: Sequence[socket.socket]) -> None:
    for sock in socks:
        sock.close()


async def closed_by_server(socks: Sequence[socket.socket], within: float = 5.0) -> int:
    """How many of ``socks`` the server closed (EOF or reset) within ``within`` seconds."""
    closed = 0
    with trio.move_on_after(within):
        for sock in socks:
            await trio.lowlevel.wait_readable(sock)
    for sock in socks:
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError:
            closed += 1
            continue
        closed += data == b""
    return closed


async def timed_requests(request: Callable[[], Awaitable[bool]], stop: trio.Event,
                         latencies: list[float], failures: list[str],
                         most: int = 2000) -> None:
    """The side client: ``request()`` one after the other until ``stop`` (at most ``most``),
    each timed; a False or an exception is a failure."""
    for _ in range(most):
        if stop.is_set():
            return
        started = trio.current_time()
        try:
            ok = await request()
        except Exception as exc:  # the failure is the result
            failures.append(f"{type(exc).__name__}: {exc}")
            ok = True
        else:
            if not ok:
                failures.append("bad answer")
        latencies.append(trio.current_time() - started)
        await trio.sleep(0.01)


def p99(latencies: Sequence[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def settle_rss(pid: int, target: int, within: float) -> int:
    """The process's RSS once at or under ``target`` bytes, or after ``within`` seconds."""
    with trio.move_on_after(within):
        while rss(pid) > target:  # noqa: ASYNC110 - another process's memory
            await trio.sleep(0.1)
    return rss(pid)
