"""What each view shows, computed from the model: the service graph with its edge legs, the
services, hosts and service-detail rows, and a split's propagation. Pure values, no widgets."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tui import fmt
from tui.events import config_reason, split_text
from tui.fmt import Status, worst
from tui.model import HostRecord, MeshModel, Traffic, process_total, sum_traffic

SUCCESS_FAIL = 0.90
SUCCESS_WARN = 0.99


def endpoints_status(up: int, total: int, routed: bool) -> Status:
    """The health of a set of endpoints (``up``: healthy and not ejected). ``routed``: traffic
    is sent to it (a subset with a weight above 0 %, or a destination without a split). Only
    routed endpoints fail: an empty 0 % subset (a canary not deployed yet, or rolled back) is
    idle, and a 0 % subset whose endpoints are all down is degraded, since no request goes
    there."""
    if total and up >= total:
        return Status.OK
    if not total:
        return Status.FAIL if routed else Status.IDLE
    if up <= 0:
        return Status.FAIL if routed else Status.WARN
    return Status.WARN


@dataclass(frozen=True)
class SubsetView:
    name: str
    version: str
    weight: int | None  # None: no split on this destination
    healthy: int
    total: int
    ejected: int = 0

    @property
    def status(self) -> Status:
        """✘ only for a subset the split sends requests to (weight above 0 %) with no endpoint
        up; a subset outside the split (or without one) whose endpoints are all down is
        degraded: the service's other endpoints take its requests."""
        return endpoints_status(self.healthy - self.ejected, self.total, bool(self.weight))


@dataclass(frozen=True)
class NodeView:
    service: str
    healthy: int
    total: int
    ejected: int
    subsets: tuple[SubsetView, ...]
    stale: bool = False  # every meshd running it is unreachable: last known data
    gateway: bool = False  # an ingress gateway: where outside traffic enters the mesh
    external: bool = False  # outside the mesh: its "instances" are the addresses resolved

    @property
    def status(self) -> Status:
        if self.stale:
            return Status.STALE
        if self.total and self.healthy - self.ejected <= 0:
            return Status.FAIL
        if self.healthy < self.total or self.ejected or any(
                s.status is Status.FAIL for s in self.subsets if s.weight):
            return Status.WARN
        return Status.OK if self.total else Status.IDLE


@dataclass(frozen=True)
class LegView:
    subset: str  # "" when the destination has no split
    weight: int | None
    traffic: Traffic
    healthy: int
    total: int
    stale: bool = False

    @property
    def status(self) -> Status:
        if self.weight and self.healthy == 0:
            return Status.FAIL
        success = self.traffic.success
        if self.stale:
            return Status.STALE
        if success is None:
            return Status.IDLE
        if success < SUCCESS_FAIL:
            return Status.FAIL
        if success < SUCCESS_WARN:
            return Status.WARN
        return Status.OK


@dataclass(frozen=True)
class EdgeView:
    source: str
    destination: str
    legs: tuple[LegView, ...]

    @property
    def status(self) -> Status:
        return worst([leg.status for leg in self.legs])

    @property
    def traffic(self) -> Traffic:
        return sum_traffic(leg.traffic for leg in self.legs)


def matches(filter_text: str, *names: str) -> bool:
    needle = filter_text.strip().lower()
    return not needle or any(needle in n.lower() for n in names)


def _split(entry: Mapping[str, Any] | None) -> dict[str, int]:
    split = (entry or {}).get("split")
    return {str(k): int(v) for k, v in split.items()} if isinstance(split, dict) else {}


def _subsets(entry: Mapping[str, Any] | None) -> dict[str, str]:
    subsets = (entry or {}).get("subsets")
    if not isinstance(subsets, dict):
        return {}
    return {str(k): str((v or {}).get("version", k)) for k, v in subsets.items()}


def ejected_instances(model: MeshModel) -> set[tuple[str, str]]:
    """(destination, instance id) pairs some meshd has ejected (outlier detection). Node and
    subset views count the ejected instances the registry still has healthy: those are what
    ejection takes out beyond the health checks (an unhealthy one is already counted out)."""
    out: set[tuple[str, str]] = set()
    for host in model.hosts.values():
        for dest, view in ((host.state or {}).get("destinations") or {}).items():
            for ep in (view or {}).get("endpoints") or []:
                if isinstance(ep, dict) and ep.get("ejected"):
                    out.add((dest, str(ep.get("instance_id"))))
    return out


def service_hosts(model: MeshModel, service: str) -> list[HostRecord]:
    return [h for h in model.sorted_hosts()
            if any(s.get("name") == service for s in (h.state or {}).get("services") or [])]


def subset_views(model: MeshModel, service: str) -> tuple[SubsetView, ...]:
    entry = model.destination_routes(service)
    subsets, split = _subsets(entry), _split(entry)
    instances = model.instances(service)
    ejected = ejected_instances(model)
    views = []
    for name, version in subsets.items():
        mine = [i for i in instances if i.version == version]
        views.append(SubsetView(
            name, version, split.get(name, 0) if split else None,
            sum(i.healthy for i in mine), len(mine),
            sum(i.healthy and (service, i.instance_id) in ejected for i in mine)))
    claimed = set(subsets.values())
    for version in sorted({i.version for i in instances} - claimed):
        if subsets:  # instances no subset selects
            mine = [i for i in instances if i.version == version]
            views.append(SubsetView("", version, None, sum(i.healthy for i in mine), len(mine)))
    return tuple(views)


def build_graph(model: MeshModel, filter_text: str = "") -> tuple[list[NodeView],
                                                                    list[EdgeView]]:
    ejected = ejected_instances(model)
    calls = model.calls()
    traffic = model.traffic()
    names = set(model.services()) | {s for pair in calls for s in pair}
    nodes: dict[str, NodeView] = {}
    gateways = model.gateways()
    externals = model.externals()
    for name in sorted(names):
        if name in externals:
            count = externals[name]
            nodes[name] = NodeView(name, count, count, 0, (), external=True)
            continue
        instances = model.instances(name)
        hosts = service_hosts(model, name)
        nodes[name] = NodeView(
            name, sum(i.healthy for i in instances), len(instances),
            sum(i.healthy and (name, i.instance_id) in ejected for i in instances),
            subset_views(model, name),
            stale=bool(hosts) and not any(h.reachable for h in hosts),
            gateway=name in gateways)
    edges = []
    for source, dest in sorted(calls):
        stale = nodes[source].stale if source in nodes else False
        edges.append(EdgeView(source, dest, _legs(model, nodes[dest], source, traffic, stale)))
    if filter_text.strip():
        edges = [e for e in edges if matches(filter_text, e.source, e.destination)]
        keep = {n for e in edges for n in (e.source, e.destination)}
        nodes = {k: v for k, v in nodes.items() if k in keep or matches(filter_text, k)}
    return list(nodes.values()), edges


def _legs(model: MeshModel, dest: NodeView, source: str,
          traffic: Mapping[tuple[str, str, str], Traffic], stale: bool) -> tuple[LegView, ...]:
    seen = {subset: t for (src, d, subset), t in traffic.items()
            if src == source and d == dest.service}
    split_subsets = [s for s in dest.subsets if s.weight is not None and s.name]
    if not split_subsets:
        return (LegView("", None, sum_traffic(seen.values()), dest.healthy - dest.ejected,
                        dest.total, stale),)
    legs = [LegView(s.name, s.weight, seen.get(s.name, Traffic()), s.healthy - s.ejected,
                    s.total, stale) for s in split_subsets]
    known = {s.name for s in split_subsets}
    for subset, t in sorted(seen.items()):
        if subset not in known and t.requests > 0:
            legs.append(LegView(subset or "(none)", None, t, 0, 0, stale))
    return tuple(legs)


# -- services, hosts -------------------------------------------------------------------------


@dataclass(frozen=True)
class HostRow:
    record: HostRecord
    age: float | None
    version: str
    uptime: float | None
    cpu_percent: float | None
    rss: float | None  # the meshd's processes together (supervisor and workers)
    connections: tuple[int, int] | None  # open (inbound, outbound); None: not reported
    staleness: float | None
    watch_error: str
    cert_expiry: float | None  # the soonest, seconds from now
    generation: int | None
    on_stored_routes: bool | None  # None: no stored table to compare with
    config_error: str
    services: tuple[str, ...]
    workers: int = 0  # worker processes (0: the one process serves)


def canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def host_rows(model: MeshModel, now: float, filter_text: str = "") -> list[HostRow]:
    stored = model.stored_routes()
    rows = []
    for host in model.sorted_hosts():
        state = host.state or {}
        services = tuple(str(s.get("name")) for s in state.get("services") or [])
        if not matches(filter_text, host.node, host.admin, *services):
            continue
        age = host.age(now)
        shift = age or 0.0
        process = state.get("process") or {}
        registry = state.get("registry") or {}
        errors = [str(w.get("error")) for w in registry.get("watches") or [] if w.get("error")]
        expiries = [float(c["expires_in_seconds"]) - shift for c in state.get("certificates") or []
                    if isinstance(c, dict) and "expires_in_seconds" in c]
        rows.append(HostRow(
            record=host, age=age, version=str(state.get("version", fmt.DASH)),
            uptime=(float(state["uptime_seconds"]) + shift) if "uptime_seconds" in state
            else None,
            cpu_percent=host.cpu_percent if host.reachable else None,
            rss=process_total(process, "rss_bytes"), connections=_connections(state),
            workers=len(process.get("workers") or []),
            staleness=(float(registry["staleness_seconds"]) + (0.0 if host.reachable else shift))
            if "staleness_seconds" in registry else None,
            watch_error=errors[0] if errors else "",
            cert_expiry=min(expiries) if expiries else None,
            generation=state.get("generation"),
            on_stored_routes=None if stored is None or not state
            else canonical(state.get("routes")) == canonical(stored),
            config_error=str(state.get("config_error") or ""),
            services=services,
        ))
    return rows


@dataclass(frozen=True)
class ServiceRow:
    node: NodeView
    inbound: Traffic
    callers: tuple[str, ...]


def service_rows(model: MeshModel, filter_text: str = "") -> list[ServiceRow]:
    nodes, edges = build_graph(model)
    rows = []
    for node in nodes:
        if not matches(filter_text, node.service):
            continue
        incoming = [e for e in edges if e.destination == node.service]
        rows.append(ServiceRow(
            node, sum_traffic(e.traffic for e in incoming),
            tuple(e.source for e in incoming)))
    return rows


# -- service detail ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ejection:
    """One calling meshd's outlier ejection of an instance."""

    by: str  # the calling host's node name
    remaining: float | None  # seconds left, as of now (the host's answer aged); None: unknown
    reason: str
    stale: bool  # the calling host is unreachable: its last known answer


@dataclass(frozen=True)
class InstanceRow:
    subset: str
    version: str
    node: str
    address: str
    status: str  # the registry's check status
    ejections: tuple[Ejection, ...]
    host: HostRecord | None
    rate: float | None
    history: tuple[float, ...]
    active: int | None = None  # requests in flight to it, summed over the hosts calling it
    active_stale: bool = False  # some of those hosts are unreachable (last known counts)

    @property
    def ejected_by(self) -> tuple[str, ...]:
        return tuple(e.by for e in self.ejections)


@dataclass(frozen=True)
class CertRow:
    node: str
    service: str
    serial: str
    not_after: str
    expires_in: float | None
    stale: bool


@dataclass(frozen=True)
class GenerationRow:
    node: str
    reachable: bool
    generation: int | None
    split: str
    on_stored_routes: bool | None
    config_error: str


@dataclass(frozen=True)
class ServiceDetail:
    service: str
    node: NodeView | None
    routes: Mapping[str, Any] | None  # the stored entry of this destination
    routes_index: int
    instances: tuple[InstanceRow, ...]
    certificates: tuple[CertRow, ...]
    generations: tuple[GenerationRow, ...]
    incoming: tuple[EdgeView, ...]


@dataclass
class _CallerView:
    """What the meshds calling a service report about one of its instances."""

    ejections: list[Ejection]
    active: int | None = None
    active_stale: bool = False


def caller_views(model: MeshModel, service: str, now: float) -> dict[str, _CallerView]:
    """Per instance id of ``service``: the ejections of every meshd that has it as an upstream
    endpoint, and its requests in flight summed over them (``active_requests`` from each
    host's ``/v1/state``; a host's last known answer is used, and flagged, while it is
    unreachable)."""
    out: dict[str, _CallerView] = {}
    for host in model.sorted_hosts():
        view = ((host.state or {}).get("destinations") or {}).get(service) or {}
        shift = host.age(now) or 0.0
        for ep in view.get("endpoints") or []:
            if not isinstance(ep, dict):
                continue
            seen = out.setdefault(str(ep.get("instance_id")), _CallerView([]))
            active = ep.get("active_requests")
            if isinstance(active, int | float) and not isinstance(active, bool):
                seen.active = (seen.active or 0) + int(active)
                seen.active_stale = seen.active_stale or not host.reachable
            if ep.get("ejected"):
                left = ep.get("ejection_remaining_seconds")
                remaining = (max(0.0, float(left) - shift)
                             if isinstance(left, int | float) else None)
                seen.ejections.append(Ejection(host.node, remaining,
                                               str(ep.get("ejection_reason") or ""),
                                               not host.reachable))
    return out


def service_detail(model: MeshModel, service: str, now: float) -> ServiceDetail:
    nodes, edges = build_graph(model)
    node = next((n for n in nodes if n.service == service), None)
    # an instance's host by node name: a host's admin API may listen apart from its address
    by_node: dict[str, HostRecord] = {}
    for host in model.sorted_hosts():  # a host seen at two admin addresses: a reachable one
        if host.node not in by_node or host.reachable:
            by_node[host.node] = host
    subsets = {s.version: s.name for s in (node.subsets if node else ()) if s.name}
    callers = caller_views(model, service, now)
    instances = []
    for inst in model.instances(service):
        found = by_node.get(inst.node)
        history = tuple(found.inbound_history.get(service, ())) if found else ()
        rate = model.inbound_traffic(found, service).rate if found and found.samples else None
        seen = callers.get(inst.instance_id)
        instances.append(InstanceRow(
            subsets.get(inst.version, ""), inst.version, inst.node, inst.address, inst.status,
            tuple(seen.ejections) if seen else (), found, rate, history,
            seen.active if seen else None, seen.active_stale if seen else False))
    instances.sort(key=lambda r: (r.subset or "~", r.node))
    certs = []
    generations = []
    stored = model.stored_routes()
    for host in model.sorted_hosts():
        state = host.state or {}
        shift = host.age(now) or 0.0
        for cert in state.get("certificates") or []:
            if cert.get("service") == service:
                left = cert.get("expires_in_seconds")
                certs.append(CertRow(host.node, service, str(cert.get("serial", ""))[:16],
                                     str(cert.get("not_after", "")),
                                     None if left is None else float(left) - shift,
                                     not host.reachable))
        generations.append(GenerationRow(
            host.node, host.reachable, state.get("generation"),
            split_text(state.get("routes"), service) if state else fmt.DASH,
            None if stored is None or not state
            else canonical(state.get("routes")) == canonical(stored),
            str(state.get("config_error") or "")))
    stored_dests = (stored or {}).get("destinations") or {}
    return ServiceDetail(
        service, node, stored_dests.get(service),
        model.registry.routes_index if model.registry else 0,
        tuple(instances), tuple(certs), tuple(generations),
        tuple(e for e in edges if e.destination == service))


# -- a split's propagation -----------------------------------------------------------------------


@dataclass(frozen=True)
class Propagation:
    applied: tuple[tuple[str, int | None], ...]  # (node, generation) on the target table
    pending: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]
    unreachable: tuple[str, ...]

    @property
    def total(self) -> int:
        return len(self.applied) + len(self.pending) + len(self.refused) + len(self.unreachable)

    @property
    def complete(self) -> bool:
        return self.total > 0 and len(self.applied) == self.total


def propagation(model: MeshModel, target: Mapping[str, Any]) -> Propagation:
    want = canonical(target)
    applied, pending, refused, unreachable = [], [], [], []
    for host in model.sorted_hosts():
        state = host.state or {}
        if not host.reachable:
            unreachable.append(host.node)
        elif canonical(state.get("routes")) == want:
            applied.append((host.node, state.get("generation")))
        elif state.get("config_error"):
            refused.append((host.node, config_reason(str(state["config_error"]))))
        else:
            pending.append(host.node)
    return Propagation(tuple(applied), tuple(pending), tuple(refused), tuple(unreachable))


def _connections(state: Mapping[str, Any]) -> tuple[int, int] | None:
    conns = state.get("connections")
    if not isinstance(conns, Mapping):
        return None
    return int(conns.get("inbound", 0)), int(conns.get("outbound", 0))
