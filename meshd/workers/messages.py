"""What the supervisor and its worker processes tell each other (``meshd.workers.channel``).

Supervisor to worker: ``Start`` (once, first, with the listening sockets), then ``SetView``,
``SetConfig``, ``SetTLS``, ``AddListener`` (with its sockets), ``CloseListener``, ``Eject``,
``Collect`` and finally ``Drain``. Worker to supervisor: ``Ready`` once serving, ``Ejected``
when its outlier detection ejects an endpoint, and a ``Reply`` to each request with a ``seq``."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from meshd.config.schema import HostConfig, LocalService, RouteTable, Upstream
from meshd.identity.tls import CertFacts
from meshd.proxy.core.outlier import Ejection
from meshd.proxy.core.view import MeshView
from meshd.registry.model import EndpointSet


@dataclass(frozen=True)
class ViewParts:
    """A ``MeshView`` as it travels (its read-only mappings as plain dicts)."""

    routes: RouteTable
    endpoints: dict[str, EndpointSet]
    external: dict[str, EndpointSet]
    generation: int

    @classmethod
    def of(cls, view: MeshView) -> ViewParts:
        return cls(view.routes, dict(view.endpoints), dict(view.external), view.generation)

    def view(self) -> MeshView:
        return MeshView(self.routes, MappingProxyType(self.endpoints), self.generation,
                        MappingProxyType(self.external))


@dataclass(frozen=True)
class Start:
    config: HostConfig
    index: int  # 0 .. count - 1
    count: int
    listeners: tuple[tuple[str, int], ...]  # (listener key, how many of the sockets)
    view: ViewParts
    tls_dir: str  # the identities' directory (the supervisor writes it, the worker reads)
    tls_services: tuple[str, ...]
    denied: frozenset[str]
    # the facts of the certificates the supervisor checked, by the digest of each file's
    # contents: the worker checks its files against them (it never parses a certificate)
    certificates: dict[str, CertFacts]
    log_level: int
    log_json: bool
    fds: int = 0


@dataclass(frozen=True)
class SetView:
    """The routes and endpoints in force (external destinations' endpoints included)."""

    view: ViewParts


@dataclass(frozen=True)
class SetConfig:
    config: HostConfig


@dataclass(frozen=True)
class SetTLS:
    """The identities on disk changed (``generation`` moved) and/or the deny list."""

    generation: int
    services: tuple[str, ...]
    denied: frozenset[str]
    certificates: dict[str, CertFacts]  # as in ``Start``


@dataclass(frozen=True)
class AddListener:
    seq: int
    service: LocalService
    upstream: Upstream
    fds: int = 0


@dataclass(frozen=True)
class CloseListener:
    """Stop accepting on an outbound listener, drain its connections until ``seconds`` from
    now; the reply comes once its sockets are closed in this worker."""

    seq: int
    service: str
    upstream: str
    seconds: float


@dataclass(frozen=True)
class Eject:
    destination: str
    ejection: Ejection


@dataclass(frozen=True)
class Collect:
    """Metrics and proxy state, for the admin API."""

    seq: int


@dataclass(frozen=True)
class Drain:
    seconds: float


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Ejected:
    destination: str
    ejection: Ejection


@dataclass(frozen=True)
class Collected:
    families: list[Any]  # prometheus_client Metric families
    endpoint_states: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    open_connections: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    seq: int
    value: Any = None
    error: str = ""
