"""`meshd run` with worker processes, as systemd runs it: a real supervisor process and its
real worker children. Under a steady load on new connections no request fails; SIGTERM sent
to every process of the service (systemd's default KillMode) is acted on by the supervisor
alone: it deregisters, its workers finish the request in flight, and every process exits 0;
a supervisor killed outright leaves no worker behind."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
from daemon.restart_testing import LoadResult, Processes, processes, steady_load, write_toml
from mesh_testing import Mesh, open_mesh, start_daemon, wait_for
from net_testing import free_port
from workers_testing import gone

from meshd.config.load import load_host_config
from meshd.config.parse import routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable
from meshd.httpd import Request, Response, serve_http

TD = "workers.mesh"
HOST_A, HOST_B = "127.0.32.2", "127.0.32.3"
ORPHAN_LIMIT = 15.0  # a worker's drain without its supervisor (5 s) and its exit, with room


@pytest.fixture(autouse=True)
def workers_from_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHD_WORKERS", raising=False)


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield await open_mesh(nursery, tmp_path, http, TD)


@pytest.fixture
async def procs() -> AsyncIterator[Processes]:
    async with processes() as started:
        yield started


async def app(address: str, port: int,
              *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(request: Request) -> Response:
        if request.path == "/slow":
            await trio.sleep(1.5)
        return Response.text("ok")

    await serve_http(handle, address, port, task_status=task_status)


async def two_hosts(nursery: trio.Nursery, mesh: Mesh, procs: Processes, tmp_path: Path
                    ) -> tuple[trio.Process, int, str]:
    """host-b in this process; host-a a `meshd run` with two workers. Returns host-a's
    process, its upstream port and its admin URL once it serves."""
    await mesh.put_routes(routes_to_data(RouteTable(default_policy=DefaultPolicy.ALLOW)) | {
        "destinations": {"payments": {"subsets": {"v1": {"version": "v1"}},
                                      "split": {"v1": 100}, "timeout": 5.0}}})
    app_port = free_port(HOST_B)
    await nursery.start(app, HOST_B, app_port)
    await start_daemon(nursery, mesh.host_config("host-b", HOST_B, [{
        "name": "payments", "port": app_port, "address": HOST_B, "version": "v1",
        "health": {"http": "/healthz", "interval": "200ms"}}], workers=1))
    upstream = free_port("127.0.0.1")
    toml = write_toml(mesh, "host-a", HOST_A, [{
        "name": "web", "port": free_port(HOST_A), "health": {"none": True},
        "upstreams": [{"name": "payments", "local_port": upstream}]}], workers=2)
    meshd = await procs.meshd(toml, tmp_path / "host-a.log")
    await meshd.wait_for("meshd host-a ready")
    for index in (0, 1):  # each worker's lines say which it is
        await meshd.wait_for(f"[worker {index}]: inbound listener mesh on")
    conf = load_host_config(toml)
    return meshd.process, upstream, f"http://{conf.admin_host}:{conf.admin_port}"


def _maps(pid: int, library: str) -> bool:
    """Whether the process has mapped a file under a folder named ``library``."""
    return library in Path(f"/proc/{pid}/maps").read_text()


def workers_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children()
            if "meshd.workers.worker" in " ".join(p.cmdline())]


async def test_meshd_run_with_workers_serves_and_stops_on_sigterm_to_every_process(
    nursery: trio.Nursery, mesh: Mesh, procs: Processes, tmp_path: Path
) -> None:
    process, upstream, admin = await two_hosts(nursery, mesh, procs, tmp_path)
    workers = workers_of(process.pid)
    assert len(workers) == 2
    # a worker never parses a certificate (its supervisor tells it what the files hold): it
    # does not load cryptography, whose native module the supervisor has mapped; nor RE2,
    # with no pattern in its routes
    assert _maps(process.pid, "/cryptography/")
    assert not any(_maps(w.pid, "/cryptography/") or _maps(w.pid, "/re2/") for w in workers)

    result = LoadResult()
    await nursery.start(steady_load, f"http://127.0.0.1:{upstream}/pay", 100, result)
    async with httpx.AsyncClient(timeout=10) as http:
        await wait_for(lambda: _answered(result, 100), limit=30)
        assert not result.failed, result.summary()
        state = (await http.get(f"{admin}/v1/state")).json()
        assert sorted(w["pid"] for w in state["process"]["workers"]) == \
            sorted(w.pid for w in workers)

        # a slow request in flight, then SIGTERM to every process of the service at once
        async def slow() -> None:
            r = await http.get(f"http://127.0.0.1:{upstream}/slow")
            slow_status.append(r.status_code)

        slow_status: list[int] = []
        nursery.start_soon(slow)
        await trio.sleep(0.3)
        for pid in [process.pid, *(w.pid for w in workers)]:
            os.kill(pid, signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    await gone([w.pid for w in workers], 5)
    assert slow_status == [200]
    registered = (await mesh.http.get(f"{mesh.registry_url}/v1/agent/services")).json()
    assert not any(s["Service"] == "web" for s in registered.values())


async def test_a_supervisor_killed_outright_leaves_no_worker_behind(
    nursery: trio.Nursery, mesh: Mesh, procs: Processes, tmp_path: Path
) -> None:
    process, _upstream, _admin = await two_hosts(nursery, mesh, procs, tmp_path)
    pids = [w.pid for w in workers_of(process.pid)]
    assert len(pids) == 2
    process.kill()
    await process.wait()
    await gone(pids, ORPHAN_LIMIT)


async def _answered(result: LoadResult, count: int) -> bool:
    return len(result.latencies) + len(result.failed) >= count
