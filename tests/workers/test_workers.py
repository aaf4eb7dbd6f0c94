"""A meshd with worker processes, over real parts: the embedded registry, the CA, daemons in
this process whose data plane runs in real worker processes (``workers = 2``), real apps, real
mTLS between hosts.

The host's admin API shows the whole host (requests summed over the workers, each worker's
process); a worker killed outright costs no request (the others accept on the same sockets)
and is started again; an ejection one worker decides is in force in every worker;
certificate renewals reach every worker (6 s certificates: a worker that kept its first one
could not open a connection after it expired); a drain ends every worker process."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
from identity.daemon_testing import until
from mesh_testing import Mesh, open_mesh, start_daemon, wait_for
from net_testing import free_port
from workers_testing import gone

from meshd.config.parse import routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable
from meshd.daemon.lifetime import Daemon
from meshd.httpd import Request, Response, serve_http
from meshd.workers.supervisor import WorkerSet

TD = "workers.mesh"
HOST_A, HOST_B, HOST_C = "127.0.31.2", "127.0.31.3", "127.0.31.4"


@pytest.fixture(autouse=True)
def workers_from_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHD_WORKERS", raising=False)  # each host's meshd.toml decides


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def app(address: str, port: int, status: int = 200,
              *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(request: Request) -> Response:
        if request.path == "/healthz":
            return Response.text("ok")
        return Response.json({"node": address}, status)

    await serve_http(handle, address, port, task_status=task_status)


def routes(policy: dict[str, Any] | None = None) -> dict[str, Any]:
    table = routes_to_data(RouteTable(default_policy=DefaultPolicy.ALLOW))
    payments: dict[str, Any] = {"subsets": {"v1": {"version": "v1"}}, "split": {"v1": 100},
                                "timeout": 5.0}
    if policy:
        payments["policy"] = policy
    return table | {"destinations": {"payments": payments}}


async def payments_host(nursery: trio.Nursery, mesh: Mesh, node: str, address: str,
                        status: int = 200) -> Daemon:
    port = free_port(address)
    await nursery.start(app, address, port, status)
    return await start_daemon(nursery, mesh.host_config(node, address, [{
        "name": "payments", "port": port, "address": address, "version": "v1",
        "health": {"http": "/healthz", "interval": "200ms"}}], workers=1))


async def web_host(nursery: trio.Nursery, mesh: Mesh, upstream_port: int,
                   **upstream: Any) -> Daemon:
    daemon = await start_daemon(nursery, mesh.host_config("host-a", HOST_A, [{
        "name": "web", "port": free_port(HOST_A), "health": {"none": True},
        "upstreams": [{"name": "payments", "local_port": upstream_port, **upstream}]}],
        workers=2))
    assert isinstance(daemon.proxy, WorkerSet)
    return daemon


async def fresh_get(port: int, path: str = "/pay") -> int:
    """One request on a connection of its own (each is accepted anew: by either worker)."""
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(f"http://127.0.0.1:{port}{path}",
                                 headers={"connection": "close"})).status_code


def worker_pids(daemon: Daemon) -> list[int]:
    assert isinstance(daemon.proxy, WorkerSet)
    return [w["pid"] for w in daemon.proxy.processes() if "pid" in w]


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_host_with_two_workers_serves_counts_and_survives_a_killed_worker(
    nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    mesh = await open_mesh(nursery, tmp_path, http, TD)
    await mesh.put_routes(routes())
    await payments_host(nursery, mesh, "host-b", HOST_B)
    upstream_port = free_port("127.0.0.1")
    host_a = await web_host(nursery, mesh, upstream_port)
    admin = f"http://{host_a.config.admin_host}:{host_a.config.admin_port}"

    async def answered() -> bool:
        return await fresh_get(upstream_port) == 200
    await wait_for(answered)
    before = metric((await http.get(f"{admin}/metrics")).text, "meshd_requests_total",
                    direction="outbound", code="200")
    for _ in range(30):
        assert await fresh_get(upstream_port) == 200

    # the admin API speaks for the whole host: every worker's requests, each worker's process
    text = (await http.get(f"{admin}/metrics")).text
    assert metric(text, "meshd_requests_total", direction="outbound", code="200") \
        == before + 30
    assert metric(text, "meshd_workers") == 2
    assert text.count("# TYPE meshd_requests_total counter") == 1
    assert text.count("# TYPE process_cpu_seconds_total counter") == 1
    state = (await http.get(f"{admin}/v1/state")).json()
    workers = state["process"]["workers"]
    assert [w["index"] for w in workers] == [0, 1] and all(w["ready"] for w in workers)
    assert all(set(w["connections"]) >= {"inbound", "outbound", "gateway"} for w in workers)
    pids = worker_pids(host_a)
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(psutil.Process(pid).ppid() == os.getpid() for pid in pids)

    # a worker killed outright: no request fails (the other accepts on the same socket), and
    # the supervisor starts it again
    os.kill(pids[0], signal.SIGKILL)
    for _ in range(20):
        assert await fresh_get(upstream_port) == 200

    async def restarted() -> bool:
        s = (await http.get(f"{admin}/v1/state")).json()
        return all(w["ready"] for w in s["process"]["workers"]) and \
            s["process"]["workers"][0]["restarts"] == 1
    await wait_for(restarted, limit=20)
    assert pids[0] not in worker_pids(host_a)
    assert metric((await http.get(f"{admin}/metrics")).text,
                  "meshd_worker_restarts_total") == 1
    for _ in range(10):
        assert await fresh_get(upstream_port) == 200

    # a drain ends every worker process
    pids = worker_pids(host_a)
    await host_a.stop()
    await gone(pids, 10)


async def test_an_ejection_decided_by_one_worker_is_in_force_in_every_worker(
    nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    mesh = await open_mesh(nursery, tmp_path, http, TD)
    await mesh.put_routes(routes({"outlier_detection": {
        "consecutive_5xx": 2, "base_ejection_time": "60s", "max_ejection_percent": 50}}))
    await payments_host(nursery, mesh, "host-b", HOST_B, status=500)  # the bad one
    await payments_host(nursery, mesh, "host-c", HOST_C)
    upstream_port = free_port("127.0.0.1")
    host_a = await web_host(nursery, mesh, upstream_port)
    workers = host_a.proxy
    assert isinstance(workers, WorkerSet)

    async def both_known() -> bool:
        await workers.gather()
        return len(workers.endpoint_states().get("payments", [])) == 2
    await wait_for(both_known)

    async def ejected_somewhere() -> bool:
        await fresh_get(upstream_port)
        await workers.gather()
        return any(e["ejected"] for e in workers.endpoint_states()["payments"])
    await wait_for(ejected_somewhere, limit=20)

    async def ejected_everywhere() -> bool:
        await workers.gather()
        return all(
            {e["node"]: e["ejected"] for e in c.endpoint_states["payments"]}
            == {"host-b": True, "host-c": False}
            for c in workers.collected())
    await wait_for(ejected_everywhere)
    assert len(workers.collected()) == 2
    for _ in range(20):  # whichever worker accepts, the bad endpoint is out
        assert await fresh_get(upstream_port) == 200


async def test_certificate_renewals_reach_every_worker(
    nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    mesh = await open_mesh(nursery, tmp_path, http, TD, leaf_lifetime=timedelta(seconds=6))
    await mesh.put_routes(routes())
    await payments_host(nursery, mesh, "host-b", HOST_B)
    upstream_port = free_port("127.0.0.1")
    # a TCP upstream: every client connection is a fresh mTLS handshake with the worker's
    # certificate of the moment
    host_a = await web_host(nursery, mesh, upstream_port, protocol="tcp")
    assert isinstance(host_a.proxy, WorkerSet)
    first, started = host_a.proxy.tls.generation, trio.current_time()

    async def echoed() -> bool:
        try:
            with trio.fail_after(5):
                stream = await trio.open_tcp_stream("127.0.0.1", upstream_port)
                async with stream:
                    await stream.send_all(b"GET /pay HTTP/1.1\r\nhost: x\r\n"
                                          b"connection: close\r\n\r\n")
                    got = b""
                    while chunk := await stream.receive_some():
                        got += chunk
            return got.startswith(b"HTTP/1.1 200")
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            return False

    await wait_for(echoed)
    # past the first certificates' end (6 s), after renewals
    tls = host_a.proxy.tls
    with trio.fail_after(20):
        await until(lambda: tls.generation >= first + 2)  # renewed twice
    await trio.sleep_until(started + 7)  # every first certificate has expired by now
    for _ in range(12):
        assert await echoed()
