"""Helpers of the restart tests: a two-host mesh whose meshds are real child processes (`meshd
run`), started either on sockets the test holds (passed as systemd passes them: ``LISTEN_FDS``)
or on their own; and a steady load at a fixed rate through host-a's outbound listener, one new
connection per request, that counts every failure.

    host-a: web ──upstream payments (127.0.0.1:<port>)──> host-b: payments v1 (a real app)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tomlkit
import trio
from mesh_testing import Mesh

from meshd.config.load import load_host_config
from meshd.dev.supervisor import ChildSpec
from meshd.listen_fds import bind_listener, host_listen_addresses

HOST_A = "127.0.21.2"
HOST_B = "127.0.21.3"
RATE = 50.0  # requests per second
REQUEST_TIMEOUT = 20.0


def write_toml(mesh: Mesh, node: str, address: str, services: list[dict[str, Any]],
               **extra: Any) -> Path:
    """``<tmp>/<node>/meshd.toml`` for a host (join token minted by ``mesh.host_config``)."""
    conf = mesh.host_config(node, address, services)
    data: dict[str, Any] = {
        "node": node, "address": address, "trust_domain": mesh.trust_domain,
        "registry": mesh.registry_url, "state_dir": "state",
        "ca": {"url": mesh.ca_url, "fingerprint": mesh.fingerprint, "token_file": "join-token"},
        "inbound": {"port": conf.inbound_port},
        "admin": {"address": f"{conf.admin_host}:{conf.admin_port}"},
        "services": services, **extra,
    }
    path = conf.ca.token_file.parent / "meshd.toml"
    path.write_text(tomlkit.dumps(data))
    return path


class HeldSockets:
    """A host's listening sockets, bound by the test as systemd's fd store would hold them."""

    def __init__(self, toml: Path) -> None:
        self.sockets = [(a.name, bind_listener(a))
                        for a in host_listen_addresses(load_host_config(toml))]

    @property
    def listen_fds(self) -> tuple[tuple[str, int], ...]:
        return tuple((name, sock.fileno()) for name, sock in self.sockets)

    def close(self) -> None:
        for _, sock in self.sockets:
            sock.close()


@dataclass
class Meshd:
    """One `meshd run` process; its output (stdout and stderr) in ``log``."""

    process: trio.Process
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, line: str, within: float = 30.0) -> float:
        """The trio time at which ``line`` was first seen in the log (polled)."""
        with trio.fail_after(within):
            while line not in self.text():
                if self.process.returncode is not None:
                    raise AssertionError(f"meshd exited ({self.process.returncode}) before "
                                         f"{line!r}:\n{self.text()[-3000:]}")
                await trio.sleep(0.01)
        return trio.current_time()


@dataclass
class Processes:
    started: list[trio.Process] = field(default_factory=list)

    async def meshd(self, toml: Path, log: Path, *, held: HeldSockets | None = None,
                    env: dict[str, str] | None = None, cwd: Path | None = None) -> Meshd:
        argv = (sys.executable, "-m", "meshd", "run", "--config", str(toml))
        spec = ChildSpec(log.stem, argv, log, listen_fds=held.listen_fds if held else ())
        environ = {**os.environ, "MESHD_LOG_LEVEL": "info", **(env or {})}
        with log.open("ab") as out:
            process = await trio.lowlevel.open_process(
                spec.command(), stdout=out, stderr=subprocess.STDOUT, env=environ,
                pass_fds=[fd for _, fd in spec.listen_fds], cwd=cwd)
        self.started.append(process)
        return Meshd(process, log)

    async def kill_all(self) -> None:
        for process in self.started:
            if process.returncode is None:
                process.kill()
                await process.wait()


@asynccontextmanager
async def processes() -> AsyncIterator[Processes]:
    """Every process started through it is killed at the end, also when the test fails."""
    started = Processes()
    try:
        yield started
    finally:
        with trio.CancelScope(shield=True):
            await started.kill_all()


@dataclass
class LoadResult:
    total: int = 0
    failed: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> str:
        worst = max(self.latencies, default=0.0)
        return (f"{len(self.failed)}/{self.total} failed, slowest answer {worst * 1000:.0f} ms"
                + ("; failures: " + "; ".join(self.failed[:10]) if self.failed else ""))


async def steady_load(url: str, count: int, result: LoadResult, rate: float = RATE,
                      *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """``count`` GETs of ``url`` at ``rate`` per second, each on a new connection (no retry
    can hide a refused or dropped one); a non-200 answer or an error is a failure."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits) as http:

        async def one(i: int) -> None:
            started = trio.current_time()
            try:
                r = await http.get(url)
            except httpx.HTTPError as exc:
                result.failed.append(f"#{i}: {type(exc).__name__} {exc}")
                return
            result.latencies.append(trio.current_time() - started)
            if r.status_code != 200:
                result.failed.append(f"#{i}: {r.status_code} {r.text[:100]}")

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            task_status.started()
            for i in range(count):
                await trio.sleep_until(start + i / rate)
                result.total += 1
                nursery.start_soon(one, i)


def listening_line(service: str, upstream: str) -> str:
    return f"outbound listener {service}->{upstream} on"
