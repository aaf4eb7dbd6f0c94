"""Connection floods against real processes: a `meshd run` and a `meshd ca serve`, each started
with the usual soft open file limit of 1024 (which they must raise themselves).

5000 idle connections that never send a byte (spread over 25 loopback source addresses, so the
per-source caps are respected) must cost at most 50 MB of RSS, and once closed the RSS must come
back within 10 % of where it started; a side client doing real requests meanwhile keeps its p99
under 50 ms; connections over the per-source cap are closed at once and counted, and the side
client is still served. The registry and the app run in the test process.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trio
from flood_testing import (
    MB,
    close_all,
    closed_by_server,
    low_fd_limit,
    open_idle,
    p99,
    raise_own_fd_limit,
    rss,
    settle_rss,
    soft_fd_limit,
    timed_requests,
)
from mesh_testing import Mesh, wait_for
from net_testing import free_port
from proc_testing import stop_process

from meshd.ca.server_tls import roots_pem
from meshd.ca.store import TokenStore, init_ca, load_ca
from meshd.config.parse import routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable
from meshd.httpd import Request, Response, serve_http
from meshd.registry.embedded.server import RegistryConfig, listen_port, serve_registry

TD = "floods.mesh"
HOST = "127.0.31.1"
IDLE = 5000
SOURCES = [f"127.0.32.{i}" for i in range(1, 26)]  # 200 connections from each
CROWDED = "127.0.33.1"  # one source that goes over its cap
INBOUND_PER_SOURCE = 300
MAX_GROWTH = 50 * MB
RETURNED = 1.10  # back within 10 % of the start
MAX_P99 = 0.050
@dataclass
class Daemons:
    ca_pid: int
    ca_url: str
    ca_roots: Path
    ca_log: Path
    meshd_pid: int
    inbound: tuple[str, int]
    outbound: str
    admin: str


def _env() -> dict[str, str]:
    return os.environ | {"MESHD_LOG_LEVEL": "info"}


async def _payments(port: int, *, task_status: trio.TaskStatus[object]) -> None:
    async def handle(request: Request) -> Response:
        return Response.json({"service": "payments", "path": request.path})

    await serve_http(handle, HOST, port, task_status=task_status)


async def _start(argv: list[str], log: Path) -> trio.Process:
    with log.open("wb") as out:
        return await trio.lowlevel.open_process(
            [sys.executable, "-m", "meshd", *argv], stdout=out, stderr=subprocess.STDOUT,
            env=_env(), preexec_fn=low_fd_limit)


def _logged(log: Path, text: str) -> bool:
    return text in log.read_text(errors="replace")


@pytest.fixture
async def daemons(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Daemons]:
    raise_own_fd_limit(IDLE + 2 * INBOUND_PER_SOURCE + 512)
    listeners = await nursery.start(serve_registry, RegistryConfig(host="127.0.0.1", port=0))
    registry_url = f"http://127.0.0.1:{listen_port(listeners)}"
    ca_dir = tmp_path / "ca"
    init_ca(ca_dir, TD, now=datetime.now(UTC))
    material = load_ca(ca_dir)
    roots = tmp_path / "roots.pem"
    roots.write_text("".join(roots_pem(material)))
    ca_port = free_port()
    procs: list[trio.Process] = []
    ca_log = tmp_path / "ca.log"
    try:
        ca = await _start(["ca", "serve", "--dir", str(ca_dir), "--listen",
                           f"127.0.0.1:{ca_port}"], ca_log)
        procs.append(ca)

        async def ca_listening() -> bool:
            return _logged(ca_log, "listening on")
        await wait_for(ca_listening, 30)
        ca_url = f"https://127.0.0.1:{ca_port}"

        async with httpx.AsyncClient(timeout=10) as http:
            mesh = Mesh(registry_url, ca_url, material.fingerprint, ca_dir, tmp_path, http, TD)
            await mesh.put_routes(routes_to_data(RouteTable(default_policy=DefaultPolicy.ALLOW))
                                  | {"destinations": {"payments": {
                                      "subsets": {"v1": {"version": "v1"}},
                                      "split": {"v1": 100}}}})
            app_port = free_port(HOST)
            await nursery.start(_payments, app_port)
            token, _ = TokenStore(ca_dir).mint("host-f", ["web", "payments"],
                                               now=datetime.now(UTC), ttl=timedelta(hours=1))
            base = tmp_path / "host-f"
            base.mkdir()
            (base / "join-token").write_text(token + "\n")
            inbound, admin, upstream = free_port(HOST), free_port(HOST), free_port()
            (base / "meshd.toml").write_text(
                f'node = "host-f"\naddress = "{HOST}"\ntrust_domain = "{TD}"\n'
                f'registry = "{registry_url}"\nstate_dir = "state"\n'
                f'[ca]\nurl = "{ca_url}"\nfingerprint = "{material.fingerprint}"\n'
                f'token_file = "join-token"\n'
                f'[inbound]\nport = {inbound}\n'
                f'max_connections_per_source = {INBOUND_PER_SOURCE}\n'
                f'[admin]\naddress = "{HOST}:{admin}"\n'
                f'[[services]]\nname = "web"\nport = {free_port(HOST)}\n'
                f'health = {{ none = true }}\n'
                f'upstreams = [{{ name = "payments", local_port = {upstream} }}]\n'
                f'[[services]]\nname = "payments"\nport = {app_port}\naddress = "{HOST}"\n'
                f'health = {{ http = "/healthz", interval = "200ms" }}\n')
            meshd = await _start(["run", "--config", str(base / "meshd.toml")],
                                 base / "meshd.log")
            procs.append(meshd)
            outbound = f"http://127.0.0.1:{upstream}"

            async def serving() -> bool:
                try:
                    return (await http.get(f"{outbound}/pay")).status_code == 200
                except httpx.HTTPError:
                    return False
            await wait_for(serving, 40)
        yield Daemons(ca.pid, ca_url, roots, ca_log, meshd.pid, (HOST, inbound), outbound,
                      f"http://{HOST}:{admin}")
    finally:
        for proc in procs:
            await stop_process(proc)


async def _metric(admin: str, name: str, labels: str) -> float:
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{admin}/metrics")).text
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@dataclass
class Flood:
    start: int
    peak: int
    after: int
    refused: int
    latencies: list[float]
    failures: list[str]

    def report(self, label: str) -> str:
        return (f"{label}: RSS start {self.start / MB:.1f} MB, peak {self.peak / MB:.1f} MB "
                f"({(self.peak - self.start) / IDLE / 1024:.1f} KB per connection), after "
                f"{self.after / MB:.1f} MB; over the cap refused {self.refused}; side client "
                f"{len(self.latencies)} requests, p99 {p99(self.latencies) * 1000:.1f} ms, "
                f"failures {self.failures[:3]}; slowest "
                f"{sorted(((round(t*1000), i) for i, t in enumerate(self.latencies)))[-5:]}")


async def _flood(pid: int, address: tuple[str, int], side: httpx.AsyncClient, url: str,
                 crowd: int) -> Flood:
    """The side client runs while ``IDLE`` idle connections are opened and held, then ``crowd``
    more from ``CROWDED``; all are closed and the RSS is followed back down."""
    latencies: list[float] = []
    failures: list[str] = []
    stop = trio.Event()

    async def request() -> bool:
        return (await side.get(url)).status_code == 200

    await request()  # the side client's connection, before the clock starts
    await trio.sleep(0.5)
    start = rss(pid)
    idle: list = []
    crowded: list = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(timed_requests, request, stop, latencies, failures)
            try:
                idle = await open_idle(address, SOURCES, IDLE)
                crowded = await open_idle(address, [CROWDED], crowd)
                refused = await closed_by_server(crowded, within=2.0)
                await trio.sleep(1.0)
                peak = rss(pid)
            finally:
                stop.set()
    finally:
        close_all(idle)
        close_all(crowded)
    after = await settle_rss(pid, int(start * RETURNED), within=5.0)
    return Flood(start, peak, after, refused, latencies, failures)


async def test_meshd_inbound_flood_is_cheap_capped_and_returned(daemons: Daemons) -> None:
    soft, hard = soft_fd_limit(daemons.meshd_pid)
    assert soft == hard and soft > 1024, f"open file limit not raised: {soft} (hard {hard})"
    async with httpx.AsyncClient(timeout=5) as side:
        flood = await _flood(daemons.meshd_pid, daemons.inbound, side,
                             f"{daemons.outbound}/pay", INBOUND_PER_SOURCE + 20)
    print(flood.report("meshd inbound"))
    assert flood.failures == [], flood.report("meshd inbound")
    assert p99(flood.latencies) < MAX_P99, flood.report("meshd inbound")
    assert flood.peak - flood.start <= MAX_GROWTH, flood.report("meshd inbound")
    assert flood.after <= flood.start * RETURNED, flood.report("meshd inbound")
    assert flood.refused == 20, flood.report("meshd inbound")
    counted = await _metric(daemons.admin, "meshd_connections_refused_total",
                            'listener="inbound",reason="source_limit"')
    assert counted == 20
    open_now = await _metric(daemons.admin, "meshd_connections_open", 'listener="inbound"')
    assert open_now < 100  # the flood is gone from the gauge too


async def test_ca_flood_is_cheap_capped_and_returned(daemons: Daemons) -> None:
    soft, hard = soft_fd_limit(daemons.ca_pid)
    assert soft == hard and soft > 1024, f"open file limit not raised: {soft} (hard {hard})"
    context = ssl.create_default_context(cafile=str(daemons.ca_roots))
    async with httpx.AsyncClient(timeout=5, verify=context) as side:
        flood = await _flood(daemons.ca_pid, ("127.0.0.1", int(daemons.ca_url.rsplit(":", 1)[1])),
                             side, f"{daemons.ca_url}/v1/ca/roots", 300)
    print(flood.report("CA"))
    assert flood.failures == [], flood.report("CA")
    assert p99(flood.latencies) < MAX_P99, flood.report("CA")
    assert flood.peak - flood.start <= MAX_GROWTH, flood.report("CA")
    assert flood.after <= flood.start * RETURNED, flood.report("CA")
    assert flood.refused == 300 - 256, flood.report("CA")  # the CA's default per-source cap
    line = (f"ca listener: refused a connection from {CROWDED}: 256 connections open from "
            f"{CROWDED} (max_connections_per_source = 256)")
    assert _logged(daemons.ca_log, line), daemons.ca_log.read_text()[-3000:]
