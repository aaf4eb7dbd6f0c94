"""Memory with many idle connections: open ``count`` client connections to one listener (host A's
outbound listener: the two-hop entry; host C's for the workers rows), send one keep-alive GET on
each and read its answer (so each is a real proxied HTTP connection, and host A holds pooled mTLS
connections to host B), leave them idle, and read the RSS of each meshd process before and after
(a meshd with workers: its supervisor and each worker separately). Everything is bounded in count
and time, and every connection is closed again before returning.
"""

from __future__ import annotations

import resource
from collections.abc import Sequence
from dataclasses import dataclass

import psutil
import trio
from bench_observe import process_tree

from meshd.config.mesh_schema import HostPort
from meshd.dev.supervisor import Child

IDLE_CONNECTIONS = 1000
OPEN_CONCURRENCY = 50       # connections being opened and asked at the same time
STEP_TIMEOUT = 10.0         # connect, or one request and its answer
IDLE_TIME_LIMIT = 90.0      # opening all of them
SETTLE_SECONDS = 1.0        # idle before the RSS is read
MAX_RESPONSE = 64 * 1024
FD_SPARE = 512              # file descriptors the bench needs besides the idle connections

MB = 1024 * 1024


@dataclass(frozen=True)
class ProcessMemory:
    """One meshd process before the idle connections were opened, and while they were held."""

    label: str               # the meshd's label, or "<meshd> supervisor" / "<meshd> worker i"
    rss_before: int          # bytes
    rss_after: int           # bytes
    tcp_after: int | None    # established TCP connections of the process while held


@dataclass(frozen=True)
class IdleResult:
    address: str             # where the connections went
    entry: str               # the label of the meshd listening there
    wanted: int
    opened: int
    answered: int            # with a 2xx
    idle_seconds: float
    processes: tuple[ProcessMemory, ...]
    first_error: str | None = None


def raise_fd_limit(connections: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (inherited by the children started afterwards:
    the meshds hold as many sockets as the bench) so ``connections`` fit; the number of idle
    connections that fit under the limit then in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + FD_SPARE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return connections
    return max(0, min(connections, soft - FD_SPARE))


async def hold_idle_connections(address: HostPort, meshds: Sequence[Child],
                                count: int = IDLE_CONNECTIONS) -> IdleResult:
    """Open ``count`` connections to ``address`` (the listener of ``meshds[0]``) with one GET
    each, hold them idle for ``SETTLE_SECONDS`` and read the RSS of every process of
    ``meshds``; close them all again."""
    before = _rss(meshds)
    streams: list[trio.SocketStream] = []
    answered = 0
    errors: list[str] = []
    limiter = trio.CapacityLimiter(OPEN_CONCURRENCY)
    request = (f"GET / HTTP/1.1\r\nHost: {address}\r\nUser-Agent: proxy_bench-idle\r\n\r\n"
               .encode())

    async def open_one() -> None:
        nonlocal answered
        async with limiter:
            stream: trio.SocketStream | None = None
            try:
                with trio.fail_after(STEP_TIMEOUT):
                    stream = await trio.open_tcp_stream(address.host, address.port)
                streams.append(stream)
                with trio.fail_after(STEP_TIMEOUT):
                    await stream.send_all(request)
                    status = await _read_response(stream)
                if 200 <= status < 300:
                    answered += 1
                elif not errors:
                    errors.append(f"answered {status}")
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError) as exc:
                if not errors:
                    errors.append(f"{type(exc).__name__}: {exc}")

    idle = 0.0
    try:
        with trio.move_on_after(IDLE_TIME_LIMIT) as scope:
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(open_one)
        if scope.cancelled_caught:
            errors.insert(0, f"gave up opening them after {IDLE_TIME_LIMIT:g}s")
        started = trio.current_time()
        await trio.sleep(SETTLE_SECONDS)
        idle = trio.current_time() - started
        after = _rss(meshds)
        tcp = _established(meshds)
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)
    processes = tuple(ProcessMemory(label, before.get(label, 0), rss, tcp.get(label))
                      for label, rss in after.items())
    return IdleResult(str(address), meshds[0].label if meshds else "?", count, len(streams),
                      answered, idle, processes, errors[0] if errors else None)


async def _read_response(stream: trio.SocketStream) -> int:
    """Read one HTTP/1.1 response with a Content-Length (or none: no body) and return its
    status; the connection stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(16384)
        if not chunk:
            raise ValueError("connection closed before the response head")
        data += chunk
        if len(data) > MAX_RESPONSE:
            raise ValueError("response head too long")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length > MAX_RESPONSE:
        raise ValueError(f"response body of {length} bytes")
    while len(body) < length:
        chunk = await stream.receive_some(16384)
        if not chunk:
            raise ValueError("connection closed in the response body")
        body += chunk
    return status


def _rss(children: Sequence[Child]) -> dict[str, int]:
    """RSS of every process of ``children`` (a meshd with workers: each separately)."""
    out: dict[str, int] = {}
    for child in children:
        for label, proc in process_tree(child):
            try:
                out[label] = proc.memory_info().rss
            except psutil.Error:
                continue
    return out


def _established(children: Sequence[Child]) -> dict[str, int]:
    out: dict[str, int] = {}
    for child in children:
        for label, proc in process_tree(child):
            try:
                conns = proc.net_connections(kind="tcp")
            except psutil.Error:
                continue
            out[label] = sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED)
    return out
