"""A three-host mesh in one process, on real loopback sockets with real mTLS.

    host a: web ──upstreams──> payments (http, split v1 50 / v2 50), ledger (tcp), broken (http),
                               orders (http, no endpoints)
    host b: payments v1 (h11 app), ledger (tcp echo), broken (an app that answers garbage)
    host c: payments v2 (h11 app)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pytest
import trio
from proxy_testing import TD, Backend, EchoServer, MiniCA, RawServer, host_config

from meshd.config.schema import (
    DestinationRoutes,
    LocalService,
    Protocol,
    RouteTable,
    SplitLeg,
    Subset,
    Upstream,
)
from meshd.metrics import Metrics
from meshd.proxy.server import Proxy
from meshd.proxy.tls import TLSState
from meshd.proxy.view import MeshView, ViewCell
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
