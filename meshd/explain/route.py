"""How a running meshd routes one request, and why: the route/endpoint half of ``meshd explain``
(``authz.py`` is the authorization half). Pure: a ``/v1/state`` document in, an ``Explanation``
out (``explain``), and its text (``render``).

The route table and endpoints in force are run through the proxy's own pure decision functions
(``matcher.explain_route`` / ``select_route``, ``router.candidates``, ``outlier.admitted``, the
ring hash), so what is explained is what the proxy does: which route matched (each condition,
passed or not), the split, and per subset the candidate endpoints with health, ejection and
requests in flight. Ejection and load appear when the daemon reports them per endpoint
(``ejected``, ``ejection_remaining_seconds``, ``ejections``, ``ejection_reason``,
``active_requests``: ``Proxy.endpoint_states``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from meshd.config.routes import parse_routes
from meshd.config.schema import DEFAULT_MAX_PENDING, DestinationRoutes, LoadBalancer, Route
from meshd.explain.authz import AuthzCheck, check_authorization, choose_source, render_authz
from meshd.proxy.core.balancer import PickInputs, RingHash
from meshd.proxy.core.matcher import RequestFacts, RouteReport, explain_route, select_route
from meshd.proxy.core.outlier import admitted
from meshd.proxy.core.router import candidates, no_endpoint_reason
from meshd.proxy.core.view import MeshView
from meshd.registry.model import Endpoint, EndpointSet

# -- the decision, explained (pure) -------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    endpoint: Endpoint
    ejected: bool | None  # None: the daemon does not report ejection
    ejection_remaining: float
    ejections: int
    ejection_reason: str
    active: int | None


@dataclass(frozen=True)
class SubsetView:
    name: str | None  # None: no split (any healthy instance)
    weight: int
    version: str
    endpoints: tuple[Candidate, ...]  # every known endpoint of the subset's version
    usable: tuple[Endpoint, ...]  # what the balancer picks from
    panic: bool
    hashed_to: Endpoint | None
    why: str


@dataclass(frozen=True)
class Explanation:
    service: str
    facts: RequestFacts
    generation: int
    dest: DestinationRoutes | None
    reports: tuple[RouteReport, ...]
    route: Route | None
    subsets: tuple[SubsetView, ...]
    notes: tuple[str, ...]
    authz: AuthzCheck

    @property
    def routable(self) -> bool:
        fault = self.route.fault if self.route is not None else None
        if fault is not None and fault.abort_status is not None and fault.abort_percent >= 100:
            return False
        return any(s.usable for s in self.subsets if s.weight > 0)

    @property
    def reaches_app(self) -> bool:
        """Routed to an endpoint and not denied there (an unknown verdict is not a denial)."""
        return self.routable and not self.authz.denied


def _endpoints(state: Mapping[str, Any], service: str) -> tuple[EndpointSet | None,
                                                                dict[str, Mapping[str, Any]]]:
    raw = state.get("destinations", {}).get(service)
    if not isinstance(raw, Mapping):
        return None, {}
    endpoints = []
    extra: dict[str, Mapping[str, Any]] = {}
    for e in raw.get("endpoints", []):
        endpoint = Endpoint(service, str(e.get("instance_id", "")), str(e.get("node", "")),
                            str(e.get("address", "")), int(e.get("port", 0)),
                            str(e.get("version", "")), bool(e.get("healthy", False)))
        endpoints.append(endpoint)
        extra[endpoint.key] = e
    return EndpointSet(service, tuple(endpoints), int(raw.get("index", 0)), 0.0), extra


def _candidate(endpoint: Endpoint, extra: Mapping[str, Any]) -> Candidate:
    ejected = extra.get("ejected")
    active = extra.get("active_requests")
    return Candidate(endpoint, bool(ejected) if ejected is not None else None,
                     float(extra.get("ejection_remaining_seconds", 0.0)),
                     int(extra.get("ejections", 0)), str(extra.get("ejection_reason", "")),
                     int(active) if active is not None else None)


def explain(state: Mapping[str, Any], service: str, facts: RequestFacts,
            source: str | None = None) -> Explanation:
    """How the meshd whose ``/v1/state`` is ``state`` routes ``facts`` to ``service``, and the
    verdict of ``service``'s authorization on them, sent by ``source`` (None: see
    ``choose_source``)."""
    table = parse_routes(state.get("routes") or {}, "the daemon's route table")
    endpoint_set, extra = _endpoints(state, service)
    view = MeshView(table, MappingProxyType({service: endpoint_set} if endpoint_set else {}))
    dest = table.get(service)
    notes: list[str] = []
    if dest is None:
        notes.append(f"no routes for {service} in the route table: any healthy instance, "
                     "round robin, no timeout")
        reports: tuple[RouteReport, ...] = ()
        route = None
    else:
        reports = explain_route(dest, facts)
        route = select_route(dest, facts)
    legs: list[tuple[str | None, int]] = (
        [(leg.subset, leg.weight) for leg in route.split] if route and route.split else [])
    hash_key = None
    policy = dest.policy if dest is not None else None
    if policy is not None and policy.hash_on is not None:
        hash_key = (facts.header(policy.hash_on.header) if policy.hash_on.header
                    else None)
        if policy.hash_on.source:
            notes.append("ring_hash on the client's address: each calling host sticks to "
                         "one endpoint (not known here)")
    ejected = {k for k, e in extra.items() if e.get("ejected")}
    subsets = []
    for name, weight in legs or [(None, 100)]:
        version = ""
        if name is not None and dest is not None:
            declared = dest.subset(name)
            version = declared.version if declared else "?"
        members = tuple(e for e in (endpoint_set.endpoints if endpoint_set else ())
                        if name is None or e.version == version)
        eligible = candidates(view, service, name)
        usable, panic = admitted(eligible, ejected)
        hashed = None
        if hash_key is not None and usable:
            hashed = RingHash().pick(None, usable, PickInputs(lambda: 0.0, hash_key=hash_key))
        if not eligible:
            why = no_endpoint_reason(view, service, name)
            if weight:
                why += f": its {weight}% of requests get a 503"
        elif panic:
            why = "every candidate is ejected: requests ignore ejection (panic)"
        else:
            why = f"{len(usable)} of {len(members)} endpoints take requests"
        subsets.append(SubsetView(name, weight, version,
                                  tuple(_candidate(e, extra.get(e.key, {})) for e in members),
                                  usable, panic, hashed, why))
    if extra and not any("ejected" in e for e in extra.values()):
        notes.append("this meshd does not report ejection state or load per endpoint")
    caller, caller_note = choose_source(state, service, source)
    authz = check_authorization(table, service, facts, caller, caller_note,
                                str(state.get("trust_domain") or ""))
    return Explanation(service, facts, int(state.get("generation", 0)), dest, reports, route,
                       tuple(subsets), tuple(notes), authz)


# -- rendering (pure) ---------------------------------------------------------------------------

def _route_summary(route: Route) -> list[str]:
    out = [f"timeout {route.timeout:g}s" if route.timeout else "no timeout"]
    r = route.retries
    if r is not None:
        per_try = f", {r.per_try_timeout:g}s per try" if r.per_try_timeout else ""
        out.append(f"retries {r.attempts} on {', '.join(r.retry_on)}{per_try}")
    f = route.fault
    if f is not None:
        if f.delay is not None:
            out.append(f"fault: delay {f.delay:g}s for {f.delay_percent:g}%")
        if f.abort_status is not None:
            out.append(f"fault: abort {f.abort_status} for {f.abort_percent:g}%")
    if route.mirror is not None:
        out.append(f"mirror {route.mirror.percent:g}% to {route.mirror.subset}")
    return out


def _policy_summary(dest: DestinationRoutes) -> str:
    p = dest.policy
    parts = [p.load_balancer.value]
    if p.load_balancer is LoadBalancer.RING_HASH and p.hash_on is not None:
        parts[0] += f" on {'header ' + p.hash_on.header if p.hash_on.header else 'source'}"
    if p.max_connections is not None:
        pending = p.max_pending_requests
        parts.append(f"max_connections {p.max_connections}, max_pending_requests "
                     f"{pending if pending is not None else f'{DEFAULT_MAX_PENDING} (default)'}")
    o = p.outlier_detection
    if o is not None:
        parts.append(f"outlier detection: eject after {o.consecutive_5xx} 5xx or "
                     f"{o.consecutive_connect_failures} connect failures in a row, "
                     f"{o.base_ejection_time:g}s growing, at most {o.max_ejection_percent}%")
    return "; ".join(parts)


def _show_checks(report: RouteReport) -> list[str]:
    return [f"       {'ok  ' if c.passed else 'FAIL'} {c.condition} (got {c.actual})"
            for c in report.checks]


def render(found: Explanation) -> str:
    f = found.facts
    header_text = ", ".join(f"{k}={v}" for k, v in f.headers.items())
    out = [f"{f.method} {f.target} to {found.service}"
           + (f" with {header_text}" if header_text else "")
           + f" (route table generation {found.generation})"]
    if found.dest is not None:
        out.append("routes, first match wins:")
        reached = True
        for i, report in enumerate(found.reports, 1):
            label = report.route.name
            if report.chosen:
                state = "MATCHED, chosen"
            elif not reached:
                state = "not reached"
            else:
                state = "no match"
            out.append(f"  {i}. {label}: {state}")
            if reached:
                out += _show_checks(report)
            if report.chosen:
                reached = False
        out.append(f"policy: {_policy_summary(found.dest)}")
    if found.route is not None:
        out.append(f"route {found.route.name}: {'; '.join(_route_summary(found.route))}")
    out += [f"note: {n}" for n in found.notes]
    for s in found.subsets:
        title = "any healthy instance (no split)" if s.name is None else \
            f"subset {s.name} ({s.weight}%, version {s.version})"
        out.append(f"{title}: {s.why}")
        usable = {e.key for e in s.usable}
        for c in s.endpoints:
            e = c.endpoint
            health = "healthy" if e.healthy else "UNHEALTHY"
            if c.ejected is None:
                ejection = "ejection ?"
            elif c.ejected:
                ejection = (f"EJECTED {c.ejection_remaining:.1f}s left "
                            f"({c.ejection_reason}, ejection {c.ejections})")
            else:
                ejection = "in service"
            load = f"active {c.active}" if c.active is not None else "active ?"
            mark = ">" if e.key in usable else " "
            hashed = "  <- the ring hash picks this one" if s.hashed_to == e else ""
            out.append(f"   {mark} {e.key}  {e.address}:{e.port}  {health}  {ejection}  "
                       f"{load}{hashed}")
        if not s.endpoints:
            out.append("     (no endpoints)")
    out += render_authz(found.authz)
    return "\n".join(out) + "\n"
