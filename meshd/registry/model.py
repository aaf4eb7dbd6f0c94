"""Immutable endpoint snapshots and their diffs: the registry's view as the proxy consumes it.

Pure: translating a registry answer (``/v1/health/connect/:service``, Consul's sidecar-proxy
convention) into ``Endpoint`` values and diffing two snapshots never touches the network."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

VERSION_META = "version"
NODE_META = "meshd-node"
LABEL_META_PREFIX = "meshd-label-"  # a host label ``zone = "eu-1"`` is ``meshd-label-zone``
ADMIN_META = "meshd-admin"  # where its host's admin API listens, "HOST:PORT" (the console reads it)
ADMIN_TLS_META = "meshd-admin-tls"  # "true": that admin API needs an operator certificate
PASSING = "passing"
CRITICAL = "critical"


@dataclass
class ProbeResult:
    """A local app's health as meshd probed it, reported to the registry by its TTL check
    (``meshd.daemon.health``) and shown in ``/v1/state``."""

    status: str  # PASSING or CRITICAL
    output: str
    at: float = 0.0


@dataclass(frozen=True, order=True)
class Endpoint:
    """One instance of a service, reached through its host's meshd inbound listener."""

    service: str
    instance_id: str
    node: str
    address: str  # the host's address, where its meshd inbound listener is
    port: int  # the host's meshd inbound port
    version: str
    healthy: bool = True
    labels: tuple[tuple[str, str], ...] = ()  # its host's labels, sorted by name

    @cached_property
    def key(self) -> str:
        # read several times for every request (ejections, tries, balancers): made once per
        # endpoint, that is once per registry update (cached_property writes the instance's
        # __dict__ directly, which a frozen dataclass allows; eq, hash and order stay on fields)
        return f"{self.node}/{self.instance_id}"

    def label(self, name: str) -> str | None:
        return next((v for k, v in self.labels if k == name), None)


@dataclass(frozen=True)
class EndpointSet:
    """Every known instance of one destination service, as of registry index ``index``,
    fetched at ``fetched_at`` (monotonic seconds)."""

    service: str
    endpoints: tuple[Endpoint, ...]
    index: int
    fetched_at: float

    def healthy(self) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.healthy)

    def by_version(self, version: str) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.healthy and e.version == version)


@dataclass(frozen=True)
class EndpointDiff:
    added: tuple[Endpoint, ...]
    removed: tuple[Endpoint, ...]
    changed: tuple[Endpoint, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def diff_endpoints(old: Iterable[Endpoint], new: Iterable[Endpoint]) -> EndpointDiff:
    before = {e.key: e for e in old}
    after = {e.key: e for e in new}
    return EndpointDiff(
        added=tuple(sorted(e for k, e in after.items() if k not in before)),
        removed=tuple(sorted(e for k, e in before.items() if k not in after)),
        changed=tuple(sorted(e for k, e in after.items() if k in before and before[k] != e)),
    )


def _passing(checks: Iterable[Mapping[str, Any]]) -> bool:
    return all(c.get("Status") == "passing" for c in checks)


def labels_from_meta(meta: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """A host's labels from a service's ``Meta`` (``LABEL_META_PREFIX`` keys)."""
    n = len(LABEL_META_PREFIX)
    return tuple(sorted((str(k)[n:], str(v)) for k, v in meta.items()
                        if isinstance(k, str) and k.startswith(LABEL_META_PREFIX)
                        and len(k) > n and isinstance(v, str)))


def endpoints_from_health_connect(
    service: str, entries: Iterable[Any]
) -> tuple[Endpoint, ...]:
    """Endpoints from a ``/v1/health/connect/<service>`` answer: the ``connect-proxy`` services
    (one per host meshd fronting an instance) with their node, address, port and version."""
    out: list[Endpoint] = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue  # a malformed answer loses that entry, never the whole view
        svc = entry.get("Service")
        if not isinstance(svc, Mapping):
            continue
        proxy = svc.get("Proxy")
        if (svc.get("Kind") != "connect-proxy" or not isinstance(proxy, Mapping)
                or proxy.get("DestinationServiceName") != service):
            continue
        node = entry.get("Node")
        node = node if isinstance(node, Mapping) else {}
        meta = svc.get("Meta")
        meta = meta if isinstance(meta, Mapping) else {}
        address = svc.get("Address") or node.get("Address") or ""
        port = svc.get("Port")
        if not address or not isinstance(port, int) or not 0 < port < 65536:
            continue
        out.append(Endpoint(
            service=service,
            instance_id=str(proxy.get("DestinationServiceID") or svc.get("ID") or ""),
            node=str(meta.get(NODE_META) or node.get("Node") or ""),
            address=str(address),
            port=int(port),
            version=str(meta.get(VERSION_META) or ""),
            healthy=_passing(entry.get("Checks") or []),
            labels=labels_from_meta(meta),
        ))
    return tuple(sorted(out))
