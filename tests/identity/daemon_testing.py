"""Real parts on loopback for identity tests at the daemon level: the embedded registry, the CA
(with a short leaf lifetime, so renewals happen within a test), daemons, a small app."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import trio
from mesh_testing import Mesh, start_daemon, wait_for
from mesh_testing import open_mesh as shared_open_mesh

from meshd.config.parse import routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable
from meshd.httpd import Request, Response, serve_http

TD = "id.mesh"

__all__ = ["TD", "DaemonMesh", "app", "open_mesh", "single_route", "start_daemon", "until",
           "wait_for"]


DaemonMesh = Mesh


async def open_mesh(nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient,
                    leaf_lifetime: timedelta = timedelta(hours=24)) -> DaemonMesh:
    return await shared_open_mesh(nursery, tmp_path, http, TD, leaf_lifetime)


def single_route(service: str, version: str) -> dict[str, Any]:
    # no authorization rules, every caller let in: these meshes are about identity
    open_table = routes_to_data(RouteTable(default_policy=DefaultPolicy.ALLOW))
    return open_table | {"destinations": {service: {
        "subsets": {version: {"version": version}}, "split": {version: 100}, "timeout": 5.0}}}


async def app(address: str, port: int, name: str,
              *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(request: Request) -> Response:
        if request.path == "/healthz":
            return Response.text("ok")
        return Response.json({"service": name, "source": request.header("x-meshd-source")})

    await serve_http(handle, address, port, task_status=task_status)


async def until(predicate: Callable[[], bool], every: float = 0.1) -> None:
    """Wait for a condition on state that several tasks change (renewal status, bundles);
    the caller bounds the wait."""
    while not predicate():  # noqa: ASYNC110 - many tasks and processes change what it reads
        await trio.sleep(every)
