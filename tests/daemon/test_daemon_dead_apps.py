"""Dead apps under steady load, with real parts: the embedded registry and the CA, four meshd
daemons in this process (host-a calls payments; b1 and b2 run payments v1, b3 payments v2) and
the shop's payments app as real child processes, killed with SIGKILL while GETs and POSTs flow
at 50 requests per second. Every request that never reached an app is retried on another
endpoint; when the whole of v1 is gone, requests fail over to v2 as the route table declares.
Each phase reports failed/total."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from mesh_testing import Mesh, open_mesh, start_daemon, wait_for
from net_testing import free_port
from proc_testing import Output

from meshd.config.parse import routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable

TD = "dead.mesh"
PAYMENTS_APP = Path(__file__).resolve().parents[2] / "examples" / "shop" / "payments.py"
RATE = 50  # requests per second, GETs and POSTs alternating
HOSTS = {"host-a": "127.0.23.2", "b1": "127.0.23.3", "b2": "127.0.23.4", "b3": "127.0.23.5"}
ZONES = {"host-a": "z1", "b1": "z1", "b2": "z2", "b3": "z1"}
VERSIONS = {"b1": "v1", "b2": "v1", "b3": "v2"}


@dataclass
class Load:
    """Requests sent through host-a's outbound listener, and how each phase went."""

    url: str
    results: list[tuple[str, int, str]] = field(default_factory=list)  # phase, status, version
    phase: str = "before"

    def tally(self, phase: str) -> tuple[int, int, list[tuple[str, int, str]]]:
        mine = [r for r in self.results if r[0] == phase]
        failed = [r for r in mine if r[1] != 200]
        return len(failed), len(mine), failed

    async def run(self, seconds: float) -> None:
        """``RATE`` requests a second for ``seconds``, on one keep-alive connection, each
        sent on schedule (a slow answer delays the next, never doubles up)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            start = trio.current_time()
            for i in range(int(seconds * RATE)):
                await trio.sleep_until(start + i / RATE)
                try:
                    if i % 2:
                        response = await client.post("/pay", json={"amount": i})
                    else:
                        response = await client.get("/pay", params={"amount": i})
                    version = response.json().get("version", "") \
                        if response.status_code == 200 else response.text.strip()
                    self.results.append((self.phase, response.status_code, version))
                except httpx.HTTPError as exc:
                    self.results.append((self.phase, 0, repr(exc)))


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield await open_mesh(nursery, tmp_path, http, TD)


@dataclass
class App:
    proc: subprocess.Popen[bytes]
    port: int


@pytest.fixture
def apps() -> Iterator[dict[str, App]]:
    """payments on b1, b2 (v1) and b3 (v2), each a child process; all stopped at the end."""
    started: dict[str, App] = {}
    try:
        for node, version in VERSIONS.items():
            port = free_port(HOSTS[node])
            proc = subprocess.Popen(
                [sys.executable, str(PAYMENTS_APP), "--address", HOSTS[node], "--port",
                 str(port), "--version", version, "--node", node],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            started[node] = App(proc, port)
            assert proc.stdout is not None
            assert Output(proc.stdout).wait_for("listening", 10), f"payments on {node}"
        yield started
    finally:
        for app in started.values():
            app.proc.kill()
            app.proc.wait(timeout=10)


def _host(mesh: Mesh, node: str, services: list[dict[str, Any]]) -> Any:
    return mesh.host_config(node, HOSTS[node], services, labels={"zone": ZONES[node]})


async def test_killed_apps_cost_no_request(
        mesh: Mesh, nursery: trio.Nursery, apps: dict[str, App]) -> None:
    open_table = routes_to_data(RouteTable(default_policy=DefaultPolicy.ALLOW))
    await mesh.put_routes(open_table | {"destinations": {"payments": {
        "subsets": {"v1": {"version": "v1", "failover": ["v2"]},
                    "v2": {"version": "v2", "failover": ["v1"]}},
        "split": {"v1": 100}, "timeout": "3s",
        # the shop's retries: a request the app was reading when it died (reset) is tried
        # again when safe; what never reached an app is retried whatever the route says
        "retries": {"attempts": 1, "per_try_timeout": "1s",
                    "retry_on": ["connect-failure", "reset", "503"]},
        "policy": {"locality": ["zone"],
                   "outlier_detection": {"consecutive_5xx": 5, "base_ejection_time": "30s"}},
    }}})
    for node, version in VERSIONS.items():
        port = apps[node].port
        await start_daemon(nursery, _host(mesh, node, [{
            "name": "payments", "port": port, "address": HOSTS[node], "version": version,
            "health": {"http": "/healthz", "interval": "200ms"}}]))
    upstream_port = free_port("127.0.0.1")
    a_conf = _host(mesh, "host-a", [{
        "name": "web", "port": free_port(HOSTS["host-a"]), "health": {"none": True},
        "upstreams": [{"name": "payments", "local_port": upstream_port}]}])
    await start_daemon(nursery, a_conf)
    admin = f"http://{a_conf.admin_host}:{a_conf.admin_port}"

    async def endpoints() -> dict[str, dict[str, Any]]:
        state = (await mesh.http.get(f"{admin}/v1/state")).json()
        found = state.get("destinations", {}).get("payments", {}).get("endpoints", [])
        return {e["node"]: e for e in found}

    async def all_healthy() -> bool:
        return sum(e["healthy"] for e in (await endpoints()).values()) == 3
    await wait_for(all_healthy, 20)
    # the hosts' labels went through the registry to host-a's endpoints
    assert {n: e["labels"] for n, e in (await endpoints()).items()} == {
        n: {"zone": ZONES[n]} for n in VERSIONS}

    load = Load(f"http://127.0.0.1:{upstream_port}")
    async with trio.open_nursery() as traffic:
        traffic.start_soon(load.run, 6.0)
        await trio.sleep(1.0)
        load.phase = "b1 killed"  # v1 in host-a's zone: b2 (v1, the other zone) remains
        apps["b1"].proc.kill()  # SIGKILL
        await trio.sleep(2.5)
        load.phase = "v1 killed"  # the whole of v1: v2 takes over, as declared
        apps["b2"].proc.kill()

    report = {phase: load.tally(phase)[:2] for phase in ("before", "b1 killed", "v1 killed")}
    print(f"failed/total per phase at {RATE} req/s: "
          + ", ".join(f"{phase}: {f}/{t}" for phase, (f, t) in report.items()))
    for phase in report:
        failed, total, which = load.tally(phase)
        assert total > 0 and failed == 0, (phase, f"{failed}/{total} failed", which[:5])
    versions = {phase: {v for p, _, v in load.results if p == phase} for phase in report}
    assert versions["before"] == {"v1"}
    assert versions["v1 killed"] >= {"v2"}
    # after the kill the registry caught up: b1 and b2 unhealthy, and v2 serves everything
    async def v1_down() -> bool:
        found = await endpoints()
        return not found["b1"]["healthy"] and not found["b2"]["healthy"]
    await wait_for(v1_down, 10)
    metrics = (await mesh.http.get(f"{admin}/metrics")).text
    assert 'meshd_failovers_total{destination="payments",subset="v1",to="v2"}' in metrics
    # the killed apps' meshds said so, and host-a retried those requests elsewhere
    assert 'meshd_retries_total{destination="payments",reason="app-connect-failed"}' in metrics
