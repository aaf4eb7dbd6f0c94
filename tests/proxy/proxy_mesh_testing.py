"""The in-process meshes the proxy tests run on (built by the ``mesh`` and ``farm`` fixtures
of ``conftest.py``): a three-host mesh in one process, on real loopback sockets with real mTLS.

    host a: web ──upstreams──> payments (http, split v1 50 / v2 50), ledger (tcp), broken (http),
                               orders (http, no endpoints)
    host b: payments v1 (h11 app), ledger (tcp echo), broken (an app that answers garbage)
    host c: payments v2 (h11 app)
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy_testing import TD, Backend, EchoServer, MiniCA, host_config

from meshd.config.routes import parse_routes
from meshd.config.schema import (
    DefaultPolicy,
    DestinationRoutes,
    LocalService,
    RouteTable,
    SplitLeg,
    Subset,
)
from meshd.identity.tls import TLSState
from meshd.metrics import Metrics
from meshd.proxy.core.view import MeshView, ViewCell
from meshd.proxy.server import Proxy
from meshd.registry.model import Endpoint, EndpointSet
from meshd.tracing.tracer import Tracer

# the route table of meshes whose subject is not authorization: no rules, every caller let in
OPEN = RouteTable(default_policy=DefaultPolicy.ALLOW)

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
            split=tuple(SplitLeg(s, w) for s, w in split), timeout=timeout),),
            DefaultPolicy.ALLOW))


def make_host(ca: MiniCA, root: Path, node: str, services: list[LocalService],
              view: ViewCell | None = None, labels: tuple[tuple[str, str], ...] = (),
              tracer: Tracer | None = None, metrics: Metrics | None = None) -> Host:
    rand = random.Random(node).random  # replayable splits
    cert_dir = root / node / "certs"
    for svc in services:
        ca.write_identity(cert_dir, svc.name)
    config = dataclasses.replace(host_config(node, root / node, services), labels=labels)
    tls = TLSState(cert_dir, TD, [s.name for s in services])
    metrics = metrics or Metrics()
    return Host(Proxy(config, view or ViewCell(MeshView(routes=OPEN)), tls, metrics, rand=rand,
                      tracer=tracer),
                metrics, tls,
                cert_dir)


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

    def endpoint(self, name: str, port: int | None = None, version: str | None = None,
                 healthy: bool = True, labels: tuple[tuple[str, str], ...] = ()) -> Endpoint:
        if version is None:
            version = self.apps[name].version if name in self.apps else "v1"
        return Endpoint("payments", f"payments-{name}", name, "127.0.0.1",
                        port if port is not None else self.hosts[name].port, version, healthy,
                        labels)

    def set_endpoints(self, *endpoints: Endpoint, service: str = "payments") -> None:
        self.view.set_endpoints(EndpointSet(service, tuple(endpoints), 1, 0.0))

    def set_routes(self, payments: Mapping[str, object]) -> None:
        """``payments``' entry in routes.toml form (subsets v1/v2 added when missing)."""
        entry = {"subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}}, **payments}
        self.view.set_routes(parse_routes({"default_policy": "allow",
                                           "destinations": {"payments": entry}}))

    def state(self, name: str) -> dict[str, object]:
        rows = self.a.proxy.endpoint_states()["payments"]
        return next(r for r in rows if r["node"] == name)
