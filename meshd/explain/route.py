"""How a running meshd routes one request, and why: the route/endpoint half of ``meshd explain``
(``authz.py`` is the authorization half). Pure: a ``/v1/state`` document in, an ``Explanation``
out (``explain``), and its text (``render``).

The route table and endpoints in force are run through the proxy's own pure decision functions
(``matcher.explain_route`` / ``select_route``, ``router.tiers`` / ``usable``, the ring hash), so
what is explained is what the proxy does: which route matched (each condition, passed or not),
the route's edge features (rate limit, redirect, header edits, rewrites: ``edge_lines``),
the split, and per subset the candidate endpoints with health, ejection and requests in flight;
where a subset has no healthy, admitted endpoint, the failover subset that takes its requests;
and, under a locality policy, which endpoints are near this host and preferred. Ejection and
load appear when the daemon reports them per endpoint
(``ejected``, ``ejection_remaining_seconds``, ``ejections``, ``ejection_reason``,
``active_requests``: ``Proxy.endpoint_states``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from meshd.config.routes import parse_routes
from meshd.config.schema import (
    DEFAULT_MAX_PENDING,
    DestinationRoutes,
    EgressMode,
    HeaderEdits,
    LoadBalancer,
    MatchKind,
    Route,
)
from meshd.explain.authz import AuthzCheck, check_authorization, choose_source, render_authz
from meshd.explain.external import egress_notes, render_external
from meshd.proxy.core.balancer import PickInputs, RingHash
from meshd.proxy.core.matcher import RequestFacts, RouteReport, explain_route, select_route
from meshd.proxy.core.retry import IMPLICIT_RETRIES
from meshd.proxy.core.rewrite import redirect_location, rewrite_path
from meshd.proxy.core.router import Labels, Tier, no_endpoint_reason, tiers, usable
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
    usable: tuple[Endpoint, ...]  # what the balancer picks from (maybe of a failover subset)
    panic: bool
    hashed_to: Endpoint | None
    why: str
    failover: tuple[str, ...] = ()  # the subset's declared failover order
    failover_to: str | None = None  # the failover subset taking its requests now
    fallback: tuple[Candidate, ...] = ()  # that subset's endpoints
    locality: str = ""  # which endpoints locality priority prefers, in words


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
    egress_mode: EgressMode = EgressMode.REGISTERED_ONLY

    @property
    def routable(self) -> bool:
        fault = self.route.fault if self.route is not None else None
        if fault is not None and fault.abort_status is not None and fault.abort_percent >= 100:
            return False
        if self.route is not None and self.route.redirect is not None:
            return False  # answered by meshd itself
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
                            str(e.get("version", "")), bool(e.get("healthy", False)),
                            _labels(e.get("labels")))
        endpoints.append(endpoint)
        extra[endpoint.key] = e
    return EndpointSet(service, tuple(endpoints), int(raw.get("index", 0)), 0.0), extra


def _labels(raw: object) -> Labels:
    if not isinstance(raw, Mapping):
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in raw.items()))


def _locality_text(keys: tuple[str, ...], here: Labels, tier: Tier) -> str:
    """Which endpoints a locality policy sends requests to, in words."""
    mine = ", ".join(f"{k}={v}" for k, v in here if k in keys) or "no locality labels"
    shared = len(keys) - tier.rank
    near = (f"same {keys[shared - 1]} as this host" if shared
            else f"no {keys[0]} shared with this host")
    return (f"locality on {', '.join(keys)} (this host: {mine}): requests go to the "
            f"{len(tier.endpoints)} healthy endpoint(s) with the {near}")


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
    here = _labels(state.get("labels"))
    keys = policy.locality if policy is not None else ()
    every = endpoint_set.endpoints if endpoint_set else ()
    subsets = []
    for name, weight in legs or [(None, 100)]:
        version = ""
        declared = dest.subset(name) if name is not None and dest is not None else None
        if name is not None:
            version = declared.version if declared else "?"
        members = tuple(e for e in every if name is None or e.version == version)
        tier, pool, panic = usable(tiers(view, service, name, here), ejected)
        hashed = None
        if hash_key is not None and pool:
            hashed = RingHash().pick(None, pool, PickInputs(lambda: 0.0, hash_key=hash_key))
        failover_to: str | None = None
        fallback: tuple[Candidate, ...] = ()
        if tier is None:
            why = no_endpoint_reason(view, service, name)
            if weight:
                why += f": its {weight}% of requests get a 503"
        elif tier.failover:
            failover_to = tier.subset
            target = dest.subset(tier.subset) if dest is not None and tier.subset else None
            fallback = tuple(_candidate(e, extra.get(e.key, {})) for e in every
                             if target is not None and e.version == target.version)
            why = (f"no healthy, admitted endpoint: its requests fail over to subset "
                   f"{tier.subset} (failover order: {', '.join(declared.failover)}), where "
                   f"{len(pool)} endpoint(s) take them" if declared is not None else "")
        elif panic:
            why = "every candidate is ejected: requests ignore ejection (panic)"
        else:
            why = f"{len(pool)} of {len(members)} endpoints take requests"
        locality = _locality_text(keys, here, tier) if keys and tier is not None else ""
        subsets.append(SubsetView(name, weight, version,
                                  tuple(_candidate(e, extra.get(e.key, {})) for e in members),
                                  pool, panic, hashed, why,
                                  declared.failover if declared is not None else (),
                                  failover_to, fallback, locality))
    if extra and not any("ejected" in e for e in extra.values()):
        notes.append("this meshd does not report ejection state or load per endpoint")
    caller, caller_note = choose_source(state, service, source)
    if dest is not None and dest.external is not None:  # no inbound side: no rules to check
        authz = AuthzCheck(service, caller, caller_note, "", facts.method, facts.target,
                           facts.path, None, None)
    else:
        authz = check_authorization(table, service, facts, caller, caller_note,
                                    str(state.get("trust_domain") or ""))
    if dest is None:
        notes += egress_notes(table, service, state)
    return Explanation(service, facts, int(state.get("generation", 0)), dest, reports, route,
                       tuple(subsets), tuple(notes), authz, table.egress)


# -- rendering (pure) ---------------------------------------------------------------------------

def _route_summary(route: Route) -> list[str]:
    out = [f"timeout {route.timeout:g}s" if route.timeout else "no timeout"]
    r = route.retries
    if r is not None:
        per_try = f", {r.per_try_timeout:g}s per try" if r.per_try_timeout else ""
        out.append(f"retries {r.attempts} on {', '.join(r.retry_on)}{per_try}")
    else:
        out.append(f"no retries declared: a request that never reached an app is tried on up "
                   f"to {IMPLICIT_RETRIES.attempts} other endpoints")
    f = route.fault
    if f is not None:
        if f.delay is not None:
            out.append(f"fault: delay {f.delay:g}s for {f.delay_percent:g}%")
        if f.abort_status is not None:
            out.append(f"fault: abort {f.abort_status} for {f.abort_percent:g}%")
    if route.mirror is not None:
        out.append(f"mirror {route.mirror.percent:g}% to {route.mirror.subset}")
    return out


def _edits_text(edits: HeaderEdits) -> str:
    parts = [*(f"add {n}: {v}" for n, v in edits.add), *(f"set {n}: {v}" for n, v in edits.set),
             *(f"remove {n}" for n in edits.remove)]
    return ", ".join(parts)


def edge_lines(route: Route, facts: RequestFacts, service: str) -> list[str]:
    """What the route's edge features do to this request (``meshd.proxy.core.edge``): its rate
    limit, a redirect (with the ``location`` this request gets), header edits and rewrites
    (with the path and host the app gets)."""
    out = []
    limit = route.rate_limit
    if limit is not None:
        key = ("one bucket for the route" if not limit.key else "a bucket per calling service"
               if limit.header is None else f"a bucket per value of header {limit.header}")
        out.append(f"rate limit: {limit.requests_per_second:g} requests/s, burst "
                   f"{limit.burst}, {key}, on each calling meshd; over it: 429 with "
                   "retry-after (how full the buckets are now is not known here)")
    matched = (route.match.path.value if route.match.path is not None
               and route.match.path.kind is MatchKind.PREFIX else None)
    host = facts.header("host") or service
    if route.redirect is not None:
        location = redirect_location(route.redirect, facts.target, host, matched)
        out.append(f"redirect: meshd answers {route.redirect.status} with location "
                   f"{location}; nothing is forwarded")
    if route.request_headers is not None:
        out.append(f"request headers: {_edits_text(route.request_headers)}")
    rewrite = route.rewrite
    if rewrite is not None:
        parts = []
        if rewrite.prefix is not None and matched is not None:
            parts.append(f"path {facts.path} -> {rewrite_path(facts.path, matched, rewrite.prefix)}"
                         f" (prefix {matched} -> {rewrite.prefix})")
        if rewrite.host is not None:
            parts.append(f"host {host} -> {rewrite.host}")
        out.append(f"rewrite: {', '.join(parts)}")
    if route.response_headers is not None:
        out.append(f"response headers: {_edits_text(route.response_headers)}")
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
    if p.locality:
        parts.append(f"locality on {', '.join(p.locality)}")
    o = p.outlier_detection
    if o is not None:
        parts.append(f"outlier detection: eject after {o.consecutive_5xx} 5xx or "
                     f"{o.consecutive_connect_failures} connect failures in a row, "
                     f"{o.base_ejection_time:g}s growing, at most {o.max_ejection_percent}%")
    return "; ".join(parts)


def _show_checks(report: RouteReport) -> list[str]:
    return [f"       {'ok  ' if c.passed else 'FAIL'} {c.condition} (got {c.actual})"
            for c in report.checks]


def _endpoint_lines(s: SubsetView, endpoints: tuple[Candidate, ...]) -> list[str]:
    usable = {e.key for e in s.usable}
    out = []
    for c in endpoints:
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
        labels = "  " + ",".join(f"{k}={v}" for k, v in e.labels) if e.labels else ""
        out.append(f"   {mark} {e.key}  {e.address}:{e.port}  {health}  {ejection}  "
                   f"{load}{labels}{hashed}")
    return out


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
        out += [f"  {line}" for line in edge_lines(found.route, f, found.service)]
    out += [f"note: {n}" for n in found.notes]
    for s in found.subsets:
        title = "any healthy instance (no split)" if s.name is None else \
            f"subset {s.name} ({s.weight}%, version {s.version})"
        out.append(f"{title}: {s.why}")
        if s.failover and s.failover_to is None:
            out.append(f"  fails over to {', '.join(s.failover)} (in that order) while it has "
                       "no healthy, admitted endpoint, or once a retry has tried them all")
        if s.locality and s.failover_to is None:
            out.append(f"  {s.locality}")
        out += _endpoint_lines(s, s.endpoints)
        if not s.endpoints:
            out.append("     (no endpoints)")
        if s.failover_to is not None:
            out.append(f"  failover subset {s.failover_to}:")
            if s.locality:
                out.append(f"  {s.locality}")
            out += _endpoint_lines(s, s.fallback)
    if found.dest is not None and found.dest.external is not None:
        out += render_external(found.dest, found.egress_mode)
    else:
        out += render_authz(found.authz)
    return "\n".join(out) + "\n"
