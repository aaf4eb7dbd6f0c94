"""What one refresh of the console sees: the registry's view (mesh instances, the stored route
table) and each meshd's ``/v1/state`` and ``/metrics``. Plain frozen values, so the console's
model and views are tested with fixed data and no network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshd.registry.model import ADMIN_META, ADMIN_TLS_META, NODE_META, VERSION_META
from tui.prom import MetricSample

_STATUS_ORDER = {"passing": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True)
class Instance:
    """One service instance as the registry lists it: the ``connect-proxy`` (meshd's inbound
    listener, on the host's address) fronting it."""

    service: str
    instance_id: str
    node: str
    address: str
    port: int
    version: str
    status: str  # passing | warning | critical
    admin: str = ""  # its host's admin API "HOST:PORT" as published ("": published nothing)
    admin_tls: bool = False  # that admin API needs an operator certificate (published)

    @property
    def healthy(self) -> bool:
        return self.status == "passing"


@dataclass(frozen=True)
class RegistryPoll:
    at: float
    error: str = ""  # "" when the registry answered
    instances: tuple[Instance, ...] = ()
    routes: Mapping[str, Any] | None = None  # the stored route table (canonical form)
    routes_index: int = 0  # its ModifyIndex (0: no such key)

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class HostPoll:
    """One meshd's admin API, read once. ``state`` and ``metrics`` are None when unreachable."""

    admin: str  # HOST:PORT of the admin API: the host's identity in the console
    node: str
    at: float
    state: Mapping[str, Any] | None = None
    metrics: MetricSample | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.state is not None and not self.error


@dataclass(frozen=True)
class Observation:
    at: float
    registry: RegistryPoll
    hosts: tuple[HostPoll, ...] = ()


def instances_from_health_connect(service: str, entries: Sequence[Any]) -> list[Instance]:
    """Instances from a ``/v1/health/connect/<service>`` answer; malformed entries are skipped
    (a console shows what it can)."""
    out: list[Instance] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        svc = entry.get("Service") or {}
        if not isinstance(svc, dict):
            continue
        node = entry.get("Node") or {}
        meta = svc.get("Meta") or {}
        proxy = svc.get("Proxy") or {}
        address = str(svc.get("Address") or (node.get("Address") if isinstance(node, dict)
                                               else "") or "")
        if not address:
            continue
        checks = entry.get("Checks") or []
        statuses = [str(c.get("Status", "critical")) for c in checks if isinstance(c, dict)]
        status = max(statuses, key=lambda s: _STATUS_ORDER.get(s, 2), default="passing")
        out.append(Instance(
            service=service,
            instance_id=str(proxy.get("DestinationServiceID") or svc.get("ID") or address),
            node=str(meta.get(NODE_META) or (node.get("Node") if isinstance(node, dict)
                                             else "") or address),
            address=address,
            port=int(svc.get("Port") or 0),
            version=str(meta.get(VERSION_META) or ""),
            status=status if status in _STATUS_ORDER else "critical",
            admin=str(meta.get(ADMIN_META) or ""),
            admin_tls=meta.get(ADMIN_TLS_META) == "true",
        ))
    return out


def mesh_services(catalog: Mapping[str, Any]) -> list[str]:
    """The services of a ``/v1/catalog/services`` answer that may have mesh instances: not the
    sidecars themselves, not Consul's own ``consul`` service."""
    return sorted(name for name in catalog
                  if not name.endswith("-sidecar-proxy") and name != "consul")
