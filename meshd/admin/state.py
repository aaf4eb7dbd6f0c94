"""The ``/v1/state`` document: one meshd's view of itself and of the mesh, as the console and
``meshd status`` read it. Pure: built from values, so its shape is tested without a daemon.

Shape (stable keys; a later console issue may add, never rename):
    node, address, trust_domain, version, ready, uptime_seconds, generation, labels{},
    ready           what /readyz answers: the daemon is ready AND no local service is critical
    daemon_ready    meshd itself is ready (identities, routes, listeners): it forwards outbound
    not_ready[]     why ``ready`` is false, one phrase each (empty when ready)
    reload          the last reload of meshd.toml, null before any: {result (applied,
                    unchanged, refused), file, at, problems[], applied[] {key, old, new},
                    failed[] {key, old, new, reason}, needs_restart[] {key, old, new,
                    reason}}; failed: live changes that could not be made (left out);
                    needs_restart: the file's changes still waiting for a restart (the
                    running value stays)
    services[]      {name, version, protocol, address, port, health, health_output, mtls}
    upstreams[]     {service, destination, local_address, local_port}
    gateways[]      {name, spiffe_id, listeners[] {address, port, protocol, redirect_https,
                    hosts[]}, routes[] {hosts[], path_prefix, service}, health}: the host's
                    ingress gateways (the console draws them as the mesh's entry nodes)
    destinations{}  name -> {index, age_seconds, endpoints[] {node, instance_id, address, port,
                             version, healthy, labels{}, and from this host's proxy: ejected,
                             ejection_remaining_seconds, ejections, ejection_reason,
                             active_requests}; an external destination's endpoints are
                             its resolved addresses (node: the host name, version
                             "external"), and it has external {hosts or addresses, port,
                             tls, sni, ca_file, lookups{} per host name: {addresses[],
                             error, resolved_at}}}
    egress          {mode (registered-only / allow-any), listener ("ADDRESS:PORT" of the
                    egress proxy listener, null when none)}
    routes          the route table in force (canonical form, as stored in the registry)
    registry        {url, stale, staleness_seconds, registered, last_contact_seconds_ago,
                     contact_error, watches[] {name, index, stale, staleness_seconds, source,
                     error}}: ``stale`` when a view in force may be out of date (never read
                     from the registry in this run, a watch failing, or no answer from the
                     registry's heartbeat for a few seconds); ``source``: registry, disk (the
                     last known state a previous run kept) or none; ``registered``: every
                     local service registered (false while the registry is unreachable)
    certificates[]  {service, spiffe_id, serial, not_after, expires_in_seconds}
    identity        {node {spiffe_id, serial, not_after, state}, certificates{} (same, per
                     service; state: valid / renewal_due / expiring / expired), roots[],
                     renew_at, retry_at, last_renewal, last_error, failures,
                     denylist {version, serials}, renewal_asked {renew_at, issued_before}
                     (null unless the CA asked for a renewal now), last_renewal_reason}
    config_error    the last rejected route table's reasons ("" when none)
    routes_signed   who signed the table in force: version, signed_at, signer, signer_id,
                    serial (null when none is in force)
    process         {pid, cpu_seconds, rss_bytes, open_fds}
    connections     {inbound, outbound}: accepted connections open now (absent before start)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import meshd
from meshd.config.external import external_data
from meshd.config.parse import routes_to_data
from meshd.config.schema import HostConfig
from meshd.identity.certs import Identity, TrustBundle
from meshd.identity.manager import IdentityStatus
from meshd.identity.signing import Signed
from meshd.proxy.core.view import MeshView
from meshd.registry.model import CRITICAL, ProbeResult
from meshd.registry.watch import RegistryContact, WatchStatus


@dataclass
class DaemonState:
    """Mutable facts the daemon gathers while running, read by ``/v1/state``."""

    started_at: float = field(default_factory=time.time)
    ready: bool = False
    stopping: bool = False
    identities: dict[str, Identity] = field(default_factory=dict)
    bundle: TrustBundle | None = None
    health: dict[str, ProbeResult] = field(default_factory=dict)
    watches: dict[str, WatchStatus] = field(default_factory=dict)
    last_config_error: str = ""
    routes_source: str = "none"  # where the table in force came from: registry, disk, none
    routes_signed: Signed | None = None  # who signed the table in force
    identity: IdentityStatus | None = None  # renewal, deny list, roots (meshd.identity.manager)
    contact: RegistryContact = field(default_factory=RegistryContact)  # the heartbeat's view
    registered: bool = False  # every local service registered at least once
    last_reload: dict[str, Any] | None = None  # meshd.daemon.reload.reload_report


def not_ready_reasons(config: HostConfig, state: DaemonState) -> list[str]:
    """Why this host should not receive traffic now (empty: it should).

    A local service whose app fails its health check makes the host not ready, as the Consul
    check of that service (and of its proxy) already says to every peer: a load balancer or a
    monitoring check reading ``/readyz`` sees the same thing peers see. The daemon still
    forwards this host's outbound traffic meanwhile (``daemon_ready``); a warning is not a
    failure (Consul sends traffic to an instance in warning)."""
    if state.stopping:
        return ["meshd is stopping"]
    reasons = [] if state.ready else ["meshd is starting (identities, routes, listeners)"]
    for svc in config.services:
        result = state.health.get(svc.name)
        if result is not None and result.status == CRITICAL:
            reasons.append(f"local service {svc.name} is critical: {result.output}")
    return reasons


def build_state(
    *, config: HostConfig, view: MeshView, state: DaemonState, now_monotonic: float,
    now_wall: float, process: Mapping[str, Any], registry_url: str,
    endpoint_states: Mapping[str, list[dict[str, Any]]] | None = None,
    connections: Mapping[str, int] | None = None,
    external: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """``endpoint_states``: ``Proxy.endpoint_states()`` (ejection and load per endpoint),
    merged into each destination's endpoints by (node, instance_id). ``external``: the
    external resolver's ``status()`` (names looked up, errors), merged into those
    destinations' ``external``."""
    proxy_view = {
        (name, e.get("node"), e.get("instance_id")): e
        for name, entries in (endpoint_states or {}).items() for e in entries
    }
    not_ready = not_ready_reasons(config, state)
    contact = state.contact.last_contact
    watches: list[dict[str, Any]] = [
        {"name": w.name, "index": w.index, "stale": w.stale(now_monotonic, contact),
         "staleness_seconds": round(w.staleness(now_monotonic, contact), 3),
         "source": w.source, "error": w.last_error}
        for w in state.watches.values()
    ]
    services = []
    for svc in config.services:
        result = state.health.get(svc.name)
        services.append({
            "name": svc.name, "version": svc.version, "protocol": svc.protocol.value,
            "address": svc.address, "port": svc.port,
            "health": result.status if result else "unknown",
            "health_output": result.output if result else "",
            "mtls": svc.mtls.value,
        })
    destinations = {
        name: {
            "index": eps.index,
            "age_seconds": round(now_monotonic - eps.fetched_at, 3),
            "endpoints": [
                {"node": e.node, "instance_id": e.instance_id, "address": e.address,
                 "port": e.port, "version": e.version, "healthy": e.healthy,
                 "labels": dict(e.labels),
                 **{k: v for k, v in proxy_view.get((name, e.node, e.instance_id), {}).items()
                    if k not in ("node", "instance_id")}}
                for e in eps.endpoints
            ],
            **_external_entry(view, name, external),
        }
        for name, eps in sorted(view.all_endpoints().items())
    }
    certificates = [
        {"service": i.service, "spiffe_id": i.spiffe_id, "serial": i.serial,
         "not_after": i.not_after.isoformat().replace("+00:00", "Z"),
         "expires_in_seconds": round(i.not_after.timestamp() - now_wall)}
        for i in state.identities.values()
    ]
    return {
        "node": config.node,
        "address": config.address,
        "trust_domain": config.trust_domain,
        "version": getattr(meshd, "__version__", "0"),
        "ready": not not_ready,
        "daemon_ready": state.ready,
        "not_ready": not_ready,
        "reload": state.last_reload,
        "uptime_seconds": round(now_wall - state.started_at, 3),
        "generation": view.generation,
        "labels": dict(config.labels),
        "inbound": {"address": config.address, "port": config.inbound_port},
        "services": services,
        "upstreams": [
            {"service": s.name, "destination": u.name,
             "local_address": config.outbound_address, "local_port": u.local_port}
            for s, u in config.upstreams
        ],
        "gateways": [
            {"name": g.name, "spiffe_id": f"spiffe://{config.trust_domain}/svc/{g.name}",
             "listeners": [{"address": x.address, "port": x.port, "protocol": x.protocol,
                            "redirect_https": x.redirect_https,
                            "hosts": sorted({h for c in x.certificates for h in c.hosts})}
                           for x in g.listeners],
             "routes": [{"hosts": list(r.hosts), "path_prefix": r.path_prefix,
                         "service": r.service} for r in g.routes],
             "health": (state.health[g.name].status if g.name in state.health
                        else "unknown")}
            for g in config.gateways
        ],
        "destinations": destinations,
        "egress": {"mode": view.routes.egress.value,
                   "listener": (f"{config.outbound_address}:{config.egress_port}"
                                if config.egress_port is not None else None)},
        "routes": routes_to_data(view.routes),
        "registry": {
            "url": registry_url,
            "stale": any(w["stale"] for w in watches),
            "staleness_seconds": max(
                (float(w["staleness_seconds"]) for w in watches), default=0.0),
            "registered": state.registered,
            "last_contact_seconds_ago": (round(now_monotonic - contact, 3)
                                         if contact is not None else None),
            "contact_error": state.contact.last_error,
            "watches": watches,
        },
        "certificates": certificates,
        "identity": (state.identity.to_json(datetime.fromtimestamp(now_wall, UTC))
                     if state.identity is not None else None),
        "config_error": state.last_config_error,
        "routes_source": state.routes_source,
        "routes_signed": (state.routes_signed.summary()
                          if state.routes_signed is not None else None),
        "process": dict(process),
        **({"connections": dict(connections)} if connections is not None else {}),
    }


def _external_entry(view: MeshView, name: str,
                    status: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """``{"external": ...}`` for an external destination (its declaration, and how its names
    resolved), else nothing."""
    dest = view.routes.get(name)
    if dest is None or dest.external is None:
        return {}
    return {"external": {**external_data(dest.external), **(status or {}).get(name, {})}}
