"""A three-host mesh in one process, on real loopback sockets with real mTLS.

    host a: web ──upstreams──> payments (http, split v1 50 / v2 50), ledger (tcp), broken (http),
                               orders (http, no endpoints)
    host b: payments v1 (h11 app), ledger (tcp echo), broken (an app that answers garbage)
    host c: payments v2 (h11 app)
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pytest
import trio
from proxy_testing import TD, Backend, EchoServer, MiniCA, RawServer, host_config

from meshd.config.routes import parse_routes
from meshd.config.schema import (
    DestinationRoutes,
    LocalService,
    Protocol,
    RouteTable,
    SplitLeg,
    Subset,
    Upstream,
)
from meshd.identity.tls import TLSState
from meshd.metrics import Metrics
from meshd.proxy.core.view import MeshView, ViewCell
from meshd.proxy.server import Proxy
from meshd.registry.model import Endpoint, EndpointSet


@dataclass
class Host:
    proxy: Proxy
    metrics: Metrics
    tls: TLSState
    cert_dir: Path

    @property
    def port(self) -> int:
        return self.proxy.inbound_address[1]


@dataclass
class Mesh:
    ca: MiniCA
    a: Host
    b: Host
    c: Host
    view: ViewCell
    v1: Backend
    v2: Backend
    echo: EchoServer

    def url(self, upstream: str = "payments") -> str:
        host, port = self.a.proxy.outbound_address("web", upstream)
        return f"http://{host}:{port}"

    def endpoint(self, service: str, host: Host, version: str = "v1",
                 port: int | None = None) -> Endpoint:
        node = "b" if host is self.b else "c"
        return Endpoint(service, f"{service}-{version}", node, "127.0.0.1",
                        port if port is not None else host.port, version)

    def set_endpoints(self, service: str, endpoints: Sequence[Endpoint]) -> None:
        self.view.set_endpoints(EndpointSet(service, tuple(endpoints), 1, 0.0))

    def set_payments(self, split: Sequence[tuple[str, int]] = (("v1", 50), ("v2", 50)),
                     timeout: float | None = None) -> None:
        self.view.set_routes(RouteTable((DestinationRoutes(
            "payments", subsets=(Subset("v1", "v1"), Subset("v2", "v2")),
            split=tuple(SplitLeg(s, w) for s, w in split), timeout=timeout),)))


def _host(ca: MiniCA, root: Path, node: str, services: list[LocalService],
          view: ViewCell | None = None) -> Host:
    rand = random.Random(node).random  # replayable splits
    cert_dir = root / node / "certs"
    for svc in services:
        ca.write_identity(cert_dir, svc.name)
    config = host_config(node, root / node, services)
    tls = TLSState(cert_dir, TD, [s.name for s in services])
    metrics = Metrics()
    return Host(Proxy(config, view or ViewCell(), tls, metrics, rand=rand), metrics, tls,
                cert_dir)


@pytest.fixture
async def mesh(tmp_path: Path, nursery: trio.Nursery) -> Mesh:
    ca = MiniCA.create()
    v1, v2 = Backend("payments", "v1"), Backend("payments", "v2")
    echo = EchoServer()
    broken = RawServer(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")
    for server in (v1, v2, echo, broken):
        await nursery.start(server.serve)

    b = _host(ca, tmp_path, "b", [
        LocalService("payments", v1.port, version="v1"),
        LocalService("ledger", echo.port, protocol=Protocol.TCP),
        LocalService("broken", broken.port),
    ])
    c = _host(ca, tmp_path, "c", [LocalService("payments", v2.port, version="v2")])
    view = ViewCell(MeshView(endpoints=MappingProxyType({})))
    a = _host(ca, tmp_path, "a", [LocalService("web", 1, upstreams=(
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


# -- a destination with several endpoints that misbehave on demand -------------------------------

@dataclass
class Farm:
    """host a: web ──> payments (http), ledger (tcp); payments v1 on hosts b1 and b2, v2 on
    host b3, each app a ``Backend`` the test can make slow, failing or silent."""

    ca: MiniCA
    root: Path
    a: Host
    hosts: dict[str, Host]
    apps: dict[str, Backend]
    view: ViewCell

    def url(self, upstream: str = "payments") -> str:
        host, port = self.a.proxy.outbound_address("web", upstream)
        return f"http://{host}:{port}"

    def endpoint(self, name: str, port: int | None = None, version: str | None = None
                 ) -> Endpoint:
        if version is None:
            version = self.apps[name].version if name in self.apps else "v1"
        return Endpoint("payments", f"payments-{name}", name, "127.0.0.1",
                        port if port is not None else self.hosts[name].port, version)

    def set_endpoints(self, *endpoints: Endpoint, service: str = "payments") -> None:
        self.view.set_endpoints(EndpointSet(service, tuple(endpoints), 1, 0.0))

    def set_routes(self, payments: Mapping[str, object]) -> None:
        """``payments``' entry in routes.toml form (subsets v1/v2 added when missing)."""
        entry = {"subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}}, **payments}
        self.view.set_routes(parse_routes({"destinations": {"payments": entry}}))

    def state(self, name: str) -> dict[str, object]:
        rows = self.a.proxy.endpoint_states()["payments"]
        return next(r for r in rows if r["node"] == name)


@pytest.fixture
async def farm(tmp_path: Path, nursery: trio.Nursery) -> Farm:
    ca = MiniCA.create()
    apps = {"b1": Backend("payments", "v1"), "b2": Backend("payments", "v1"),
            "b3": Backend("payments", "v2")}
    for app in apps.values():
        await nursery.start(app.serve)
    hosts = {name: _host(ca, tmp_path, name, [LocalService("payments", app.port,
                                                           version=app.version)])
             for name, app in apps.items()}
    view = ViewCell()
    a = _host(ca, tmp_path, "a", [LocalService("web", 1, upstreams=(
        Upstream("payments", 0), Upstream("ledger", 0, Protocol.TCP)))], view)
    for host in (*hosts.values(), a):
        await nursery.start(host.proxy.run)
    farm = Farm(ca, tmp_path, a, hosts, apps, view)
    farm.set_endpoints(farm.endpoint("b1"), farm.endpoint("b2"), farm.endpoint("b3"))
    farm.set_routes({"split": {"v1": 100}})
    return farm
