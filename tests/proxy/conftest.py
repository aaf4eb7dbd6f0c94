"""Fixtures of the proxy tests: ``mesh`` and ``farm`` (``proxy_mesh_testing`` describes them)."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest
import trio
from proxy_mesh_testing import OPEN, Farm, Mesh, make_host
from proxy_testing import Backend, EchoServer, MiniCA, RawServer

from meshd.config.schema import (
    LocalService,
    Protocol,
    Upstream,
)
from meshd.proxy.core.view import MeshView, ViewCell


@pytest.fixture
async def mesh(tmp_path: Path, nursery: trio.Nursery) -> Mesh:
    ca = MiniCA.create()
    v1, v2 = Backend("payments", "v1"), Backend("payments", "v2")
    echo = EchoServer()
    broken = RawServer(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")
    for server in (v1, v2, echo, broken):
        await nursery.start(server.serve)

    b = make_host(ca, tmp_path, "b", [
        LocalService("payments", v1.port, version="v1"),
        LocalService("ledger", echo.port, protocol=Protocol.TCP),
        LocalService("broken", broken.port),
    ])
    c = make_host(ca, tmp_path, "c", [LocalService("payments", v2.port, version="v2")])
    view = ViewCell(MeshView(routes=OPEN, endpoints=MappingProxyType({})))
    a = make_host(ca, tmp_path, "a", [LocalService("web", 1, upstreams=(
        Upstream("payments", 0), Upstream("ledger", 0, Protocol.TCP), Upstream("broken", 0),
        Upstream("orders", 0)))], view)
    for host in (b, c, a):
        await nursery.start(host.proxy.run)

    m = Mesh(ca, a, b, c, view, v1, v2, echo)
    m.set_payments()
    m.set_endpoints("payments", [m.endpoint("payments", b, "v1"),
                                 m.endpoint("payments", c, "v2")])
    m.set_endpoints("ledger", [m.endpoint("ledger", b)])
    m.set_endpoints("broken", [m.endpoint("broken", b)])
    return m


@pytest.fixture
async def farm(tmp_path: Path, nursery: trio.Nursery) -> Farm:
    ca = MiniCA.create()
    apps = {"b1": Backend("payments", "v1"), "b2": Backend("payments", "v1"),
            "b3": Backend("payments", "v2")}
    for app in apps.values():
        await nursery.start(app.serve)
    hosts = {name: make_host(ca, tmp_path, name, [LocalService("payments", app.port,
                                                           version=app.version)])
             for name, app in apps.items()}
    view = ViewCell(MeshView(routes=OPEN))
    a = make_host(ca, tmp_path, "a", [LocalService("web", 1, upstreams=(
        Upstream("payments", 0), Upstream("ledger", 0, Protocol.TCP)))], view)
    for host in (*hosts.values(), a):
        await nursery.start(host.proxy.run)
    farm = Farm(ca, tmp_path, a, hosts, apps, view)
    farm.set_endpoints(farm.endpoint("b1"), farm.endpoint("b2"), farm.endpoint("b3"))
    farm.set_routes({"split": {"v1": 100}})
    return farm
