"""The configuration tree: frozen dataclasses, nothing else.

``meshd.toml`` (one per host) becomes a ``HostConfig``; ``routes.toml`` (mesh-wide, stored in the
registry's KV) becomes a ``RouteTable``. Parsing and validation live in ``meshd.config.parse``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class Protocol(StrEnum):
    HTTP = "http"
    TCP = "tcp"


@dataclass(frozen=True)
class HealthCheck:
    """How meshd checks its local app. ``kind`` is ``http`` (GET ``path``, 2xx passes), ``tcp``
    (a connect passes) or ``none`` (always passing: for apps with nothing to check)."""

    kind: str = "tcp"
    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0


@dataclass(frozen=True)
class Upstream:
    """A destination this service calls, reached at ``outbound_address:local_port``.

    ``protocol`` is how the outbound listener treats it: ``http`` (parsed, routed per request)
    or ``tcp`` (an opaque byte stream, one endpoint chosen per connection)."""

    name: str
    local_port: int
    protocol: Protocol = Protocol.HTTP


@dataclass(frozen=True)
class LocalService:
    name: str
    port: int
    protocol: Protocol = Protocol.HTTP
    version: str = "v1"
    address: str = "127.0.0.1"
    health: HealthCheck = field(default_factory=HealthCheck)
    upstreams: tuple[Upstream, ...] = ()

    @property
    def instance_id(self) -> str:
        return f"{self.name}-{self.version}"


@dataclass(frozen=True)
class CASettings:
    url: str
    fingerprint: str
    token_file: Path


@dataclass(frozen=True)
class HostConfig:
    node: str
    address: str
    trust_domain: str
    registry_url: str
    ca: CASettings
    inbound_port: int
    admin_host: str = "127.0.0.1"
    admin_port: int = 15000
    outbound_address: str = "127.0.0.1"
    state_dir: Path = Path("/var/lib/meshd")
    services: tuple[LocalService, ...] = ()
    source: str = ""

    def service(self, name: str) -> LocalService | None:
        return next((s for s in self.services if s.name == name), None)

    @property
    def upstreams(self) -> tuple[tuple[LocalService, Upstream], ...]:
        return tuple((s, u) for s in self.services for u in s.upstreams)


@dataclass(frozen=True)
class Subset:
    """A named slice of a service's instances, selected by the instance's version."""

    name: str
    version: str


@dataclass(frozen=True)
class SplitLeg:
    subset: str
    weight: int


@dataclass(frozen=True)
class DestinationRoutes:
    """Routing for one destination service: a weighted split over its subsets and a timeout.

    An empty ``split`` means "every healthy instance, no subset preference"."""

    service: str
    subsets: tuple[Subset, ...] = ()
    split: tuple[SplitLeg, ...] = ()
    timeout: float | None = None

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)


@dataclass(frozen=True)
class RouteTable:
    destinations: tuple[DestinationRoutes, ...] = ()

    def get(self, service: str) -> DestinationRoutes | None:
        return next((d for d in self.destinations if d.service == service), None)
