"""``meshd explain SERVICE``: how a running meshd would route one request, and why.

It reads the route table and endpoints in force from the daemon's admin ``/v1/state`` and runs
them through the proxy's own pure decision functions (``matcher.explain_route`` / ``select_
route``, ``router.candidates``, ``outlier.admitted``, the ring hash), so what it prints is what
the proxy does: which route matched (each condition, passed or not), the split, and per subset
the candidate endpoints with health, ejection and requests in flight. Ejection and load appear
when the daemon reports them per endpoint (``ejected``, ``ejection_remaining_seconds``,
``ejections``, ``ejection_reason``, ``active_requests``: ``Proxy.endpoint_states``).

Then authorization, which the destination's own meshd enforces with its
``[destinations.NAME.authorization]`` rules (the route table is the same on every host): each
rule, whether it applies, and the verdict of the proxy's ``authorize`` on the caller, method and
normalised path, naming the rule that decided or the default deny (``meshd.explain.authz``). The
caller is ``--source``, or else the asked host's one local service that has SERVICE as an
upstream; without either there is no verdict when the destination has rules.

Exit status: 0 when the request would be sent to an endpoint (and, as far as known, let in), 1
when it would be answered by meshd itself (no healthy endpoint, fault abort for every request,
or a 403 from the destination's meshd: denied by its rules), 2 when the admin API cannot be read
or an option is malformed. ``explain`` and ``render`` are pure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import httpx

from meshd.config.routes import parse_routes
from meshd.config.schema import DEFAULT_MAX_PENDING, DestinationRoutes, LoadBalancer, Route
from meshd.errors import ConfigError
from meshd.explain.authz import AuthzCheck, check_authorization, choose_source, render_authz
from meshd.httpd import parse_hostport
from meshd.names import NAME_RULE, is_valid_name
from meshd.proxy.core.balancer import PickInputs, RingHash
from meshd.proxy.core.matcher import RequestFacts, RouteReport, explain_route, select_route
from meshd.proxy.core.outlier import admitted
from meshd.proxy.core.router import candidates, no_endpoint_reason
from meshd.proxy.core.view import MeshView
from meshd.registry.model import Endpoint, EndpointSet

DEFAULT_ADMIN = "http://127.0.0.1:15000"
EXIT_ROUTED, EXIT_NOT_ROUTED, EXIT_UNREACHABLE = 0, 1, 2


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "explain", help="show how a request to SERVICE would be routed and authorized, and why",
        description="Ask a running meshd (its admin /v1/state) which route a request to "
        "SERVICE matches, the split, the candidate endpoints with health, ejection and "
        "load, and whether SERVICE's authorization rules (enforced by its own meshd) let the "
        "caller in, naming the rule that decides. Exit 0 if it would reach an endpoint and "
        "be let in, 1 if not (no endpoint, fault abort, or a 403 from SERVICE's meshd), 2 if "
        "the admin API is unreachable.")
    p.add_argument("service", metavar="SERVICE", help="the destination service")
    p.add_argument("--method", default="GET", help="request method (default: GET)")
    p.add_argument("--path", default="/", help="request path, may carry ?query (default: /)")
    p.add_argument("--header", action="append", default=[], metavar="K=V",
                   help="a request header (repeatable)")
    p.add_argument("--source", metavar="SERVICE",
                   help="the calling service, whose identity (spiffe://TRUST_DOMAIN/svc/NAME) "
                   "the destination's meshd checks its authorization rules against (default: "
                   "the asked host's local service with the destination as an upstream, if "
                   "there is exactly one; else no verdict is shown)")
    p.add_argument("--admin", default=DEFAULT_ADMIN, metavar="ADDR",
                   help=f"the daemon's admin address (default: {DEFAULT_ADMIN})")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                   help="how long to wait for the admin API (default: 3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    headers = []
    for item in args.header:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            print(f"meshd explain: --header {item!r}: expected NAME=VALUE", file=sys.stderr)
            return EXIT_UNREACHABLE
        headers.append((name.strip(), value))
    if args.source is not None and not is_valid_name(args.source):
        print(f"meshd explain: --source {args.source!r}: not a service name ({NAME_RULE})",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        url = _state_url(args.admin)
    except ValueError as exc:
        print(f"meshd explain: --admin: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        with httpx.Client(timeout=args.timeout, trust_env=False) as http:
            response = http.get(url)
        response.raise_for_status()
        state = response.json()
        if not isinstance(state, dict) or "routes" not in state:
            raise ValueError("the answer is not a meshd state document")
    except (httpx.HTTPError, ValueError) as exc:
        print(f"meshd explain: cannot read {url}: {exc or type(exc).__name__} "
              "(is meshd running, and is --admin its admin address?)", file=sys.stderr)
        return EXIT_UNREACHABLE
    path = args.path if args.path.startswith("/") else "/" + args.path
    facts = RequestFacts(args.method.upper(), path, headers)
    try:
        found = explain(state, args.service, facts, args.source)
    except ConfigError as exc:
        print(f"meshd explain: the daemon's route table does not parse: {exc}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    print(render(found), end="")
    return EXIT_ROUTED if found.reaches_app else EXIT_NOT_ROUTED


def _state_url(admin: str) -> str:
    text = admin.removeprefix("http://").rstrip("/")
    host, port = parse_hostport(text)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1/state"


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
    authz = check_authorization(dest, service, facts, caller, caller_note,
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

