"""``routes.toml``, the mesh's traffic rules: a parsed mapping (or its canonical JSON form, as
kept in the registry's KV) in, a frozen ``RouteTable`` out, or a ``ConfigError`` listing every
problem with its key path; and back (``routes_to_data``). Pure.

Per destination: ``subsets``; ordered ``[[routes]]`` (``match`` on path, method, headers, query;
``split``, ``timeout``, ``retries``, ``fault``, ``mirror``; and at the edge ``rate_limit``,
``request_headers``, ``response_headers``, ``rewrite``, ``redirect``: ``route_edge``), first
match wins; the destination-level ``split``/``timeout``/``retries``/``fault``/``mirror`` (and
``rate_limit``/``request_headers``/``response_headers``) form the default route that serves
what no route matches; ``policy`` (load balancer, connection limits, outlier
detection, retry budget, request body limit); and ``authorization`` (ordered allow/deny rules
on the caller's identity, path and method, checked by the destination's inbound side). A
file with only ``subsets``/``split``/``timeout`` (the first format) means what it always
meant. Regular expressions are compiled here, so a bad one is a config error, never a
request-time one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from meshd.config.external import (
    check_external_names,
    external_data,
    parse_egress,
    parse_external,
)
from meshd.config.reader import Reader
from meshd.config.route_edge import (
    header_edits_data,
    parse_header_edits,
    parse_rate_limit,
    parse_redirect,
    parse_rewrite,
    rate_limit_data,
    redirect_data,
    rewrite_data,
)
from meshd.config.route_parts import (
    authorization_data,
    get_integer,
    get_number,
    get_table,
    match_data,
    parse_authorization,
    parse_match,
    parse_policy,
    policy_data,
)
from meshd.config.schema import (
    GRPC_RETRY_CONDITIONS,
    RETRY_CONDITIONS,
    DefaultPolicy,
    DestinationPolicy,
    DestinationRoutes,
    EgressMode,
    FaultPolicy,
    HeaderEdits,
    MirrorPolicy,
    RateLimit,
    RetryPolicy,
    Route,
    RouteMatch,
    RouteTable,
    SplitLeg,
    Subset,
)
from meshd.names import is_valid_name

# the edge features a destination's default route may have too (``rewrite`` and ``redirect``
# need a route's own match)
EDGE_KEYS = {"rate_limit", "request_headers", "response_headers"}
DESTINATION_KEYS = {"subsets", "split", "timeout", "retries", "fault", "mirror", "routes",
                    "policy", "authorization", "external", *EDGE_KEYS}
ROUTE_KEYS = {"name", "match", "split", "timeout", "retries", "fault", "mirror", *EDGE_KEYS,
              "rewrite", "redirect"}
RETRY_KEYS = {"attempts", "per_try_timeout", "retry_on"}
FAULT_KEYS = {"delay", "delay_percent", "abort_status", "abort_percent"}
MIRROR_KEYS = {"subset", "percent"}
MAX_RETRY_ATTEMPTS = 10

_STATUS_RE = re.compile(r"^[45][0-9][0-9]$")


def parse_routes(data: Mapping[str, Any], file: str = "routes.toml") -> RouteTable:
    """Build a ``RouteTable`` from a parsed ``routes.toml`` (or its canonical JSON form)."""
    r = Reader(file)
    r.unknown_keys(data, "", {"destinations", "default_policy", "clear", "egress"})
    cleared = r.get(data, "clear", "", bool, False) is True
    default_policy = r.choice(data, "default_policy", "", DefaultPolicy,
                              [p.value for p in DefaultPolicy], DefaultPolicy.DENY)
    dests_raw = r.get(data, "destinations", "", dict, {}) or {}
    dests: list[DestinationRoutes] = []
    for service, raw in dests_raw.items():
        path = f"destinations.{service}"
        if not is_valid_name(service):
            r.problem(path, f"invalid service name {service!r}")
            continue
        if not isinstance(raw, dict):
            r.problem(path, "expected a table")
            continue
        dest = _parse_destination(r, service, raw, path)
        if dest is not None:
            dests.append(dest)
    if cleared and dests_raw:
        r.problem("clear", "clear = true empties the table: it takes no destinations")
    egress = parse_egress(r, data)
    check_external_names(r, dests)
    r.fail_if_problems()
    return RouteTable(tuple(sorted(dests, key=lambda d: d.service)),
                      default_policy or DefaultPolicy.DENY, cleared, egress)


def _parse_destination(
    r: Reader, service: str, raw: Mapping[str, Any], path: str
) -> DestinationRoutes | None:
    before = len(r.problems)
    r.unknown_keys(raw, path, DESTINATION_KEYS)
    subsets: list[Subset] = []
    for name, sub in (r.get(raw, "subsets", path, dict, {}) or {}).items():
        spath = f"{path}.subsets.{name}"
        if not is_valid_name(name):
            r.problem(spath, f"invalid subset name {name!r}")
            continue
        if not isinstance(sub, dict):
            r.problem(spath, "expected a table like { version = \"v1\" }")
            continue
        r.unknown_keys(sub, spath, {"version", "failover"})
        version = r.name(sub, "version", spath)
        failover = _failover_names(r, sub, spath, name)
        if version is not None:
            subsets.append(Subset(name, version, failover))
    known = {s.name for s in subsets}
    _check_failover(r, subsets, path, known)
    split = _split(r, raw, path, known)
    timeout = r.duration(raw, "timeout", path, None)
    retries = _retries(r, raw, path)
    fault = _fault(r, raw, path)
    mirror = _mirror(r, raw, path, known)
    routes: list[Route] = []
    names: set[str] = set()
    routes_raw = r.get(raw, "routes", path, list, []) or []
    for i, route_raw in enumerate(routes_raw):
        rpath = f"{path}.routes[{i}]"
        if not isinstance(route_raw, dict):
            r.problem(rpath, "expected a table")
            continue
        route = _parse_route(r, route_raw, rpath, i, known)
        if route is None:
            continue
        if route.name in names:
            r.problem(f"{rpath}.name", f"route name {route.name!r} used twice")
            continue
        names.add(route.name)
        routes.append(route)
    policy = parse_policy(r, raw, path)
    authorization = parse_authorization(r, raw, path)
    rate_limit, request_headers, response_headers = _edge(r, raw, path)
    external = parse_external(r, raw, path)
    if len(r.problems) != before:
        return None
    return DestinationRoutes(service, tuple(subsets), split or (), timeout, tuple(routes),
                             retries, fault, mirror, policy or DestinationPolicy(),
                             authorization, rate_limit, request_headers, response_headers,
                             external)


def _edge(r: Reader, raw: Mapping[str, Any], path: str
          ) -> tuple[RateLimit | None, HeaderEdits | None, HeaderEdits | None]:
    return (parse_rate_limit(r, raw, path),
            parse_header_edits(r, raw, "request_headers", path),
            parse_header_edits(r, raw, "response_headers", path))


def _failover_names(r: Reader, raw: Mapping[str, Any], path: str,
                    subset: str) -> tuple[str, ...]:
    """``failover = ["v2", ...]``: other subsets' names, in order (checked against the
    declared subsets once all are read: ``_check_failover``)."""
    if "failover" not in raw:
        return ()
    listed = r.get(raw, "failover", path, list)
    if listed is None:
        return ()
    fpath = f"{path}.failover"
    if not listed:
        r.problem(fpath, "empty: leave it out for no failover")
    out: list[str] = []
    for item in listed:
        if not isinstance(item, str):
            r.problem(fpath, f"expected subset names, got {item!r}")
        elif item == subset:
            r.problem(fpath, f"subset {subset!r} cannot fail over to itself")
        elif item in out:
            r.problem(fpath, f"subset {item!r} listed twice")
        else:
            out.append(item)
    return tuple(out)


def _check_failover(r: Reader, subsets: list[Subset], path: str, known: set[str]) -> None:
    """Every failover target is a declared subset. Two subsets may fail over to each other
    (v1 -> v2 and v2 -> v1): only the chosen subset's own list is followed, never a target's,
    so no chain can loop."""
    for s in subsets:
        for target in s.failover:
            if target not in known:
                r.problem(f"{path}.subsets.{s.name}.failover",
                          f"unknown subset {target!r} (declared: {', '.join(sorted(known))})")


def _split(r: Reader, raw: Mapping[str, Any], path: str,
           known: set[str]) -> tuple[SplitLeg, ...] | None:
    """The weighted split at ``path.split``, or None when absent (or wrong)."""
    if "split" not in raw:
        return None
    split_raw = r.get(raw, "split", path, dict)
    if split_raw is None:
        return None
    split: list[SplitLeg] = []
    for name, weight in split_raw.items():
        lpath = f"{path}.split.{name}"
        if isinstance(weight, bool) or not isinstance(weight, int):
            r.problem(lpath, f"weight must be an integer, got {weight!r}")
            continue
        if not 0 <= weight <= 100:
            r.problem(lpath, f"weight {weight} out of range (0-100)")
            continue
        if name not in known:
            hint = f" (declared: {', '.join(sorted(known))})" if known else \
                " (declare it under subsets)"
            r.problem(lpath, f"unknown subset {name!r}{hint}")
            continue
        split.append(SplitLeg(name, weight))
    if len(split) != len(split_raw):
        return None
    if split:
        total = sum(leg.weight for leg in split)
        if total != 100:
            r.problem(f"{path}.split", f"weights sum to {total}, must sum to 100")
            return None
    return tuple(split)


# -- routes ---------------------------------------------------------------------------------------

def _parse_route(r: Reader, raw: Mapping[str, Any], path: str, index: int,
                 known: set[str]) -> Route | None:
    before = len(r.problems)
    r.unknown_keys(raw, path, ROUTE_KEYS)
    name = r.name(raw, "name", path, None) or _generated_name(index)
    if name == "default":
        r.problem(f"{path}.name", "'default' names the destination-level route")
    match = RouteMatch()
    if "match" in raw:
        match_raw = r.get(raw, "match", path, dict)
        if match_raw is not None:
            match = parse_match(r, match_raw, f"{path}.match")
    split = _split(r, raw, path, known)
    timeout = r.duration(raw, "timeout", path, None)
    retries = _retries(r, raw, path)
    fault = _fault(r, raw, path)
    mirror = _mirror(r, raw, path, known)
    rate_limit, request_headers, response_headers = _edge(r, raw, path)
    rewrite = parse_rewrite(r, raw, path, match)
    redirect = parse_redirect(r, raw, path, match)
    if len(r.problems) != before:
        return None
    return Route(name, match, split, timeout, retries, fault, mirror, rate_limit,
                 request_headers, response_headers, rewrite, redirect)


def _generated_name(index: int) -> str:
    # Not a valid explicit name, so it can never clash with one.
    return f"routes[{index}]"


# -- what a route does ------------------------------------------------------------------------

def _retries(r: Reader, raw: Mapping[str, Any], path: str) -> RetryPolicy | None:
    found = get_table(r, raw, "retries", path, RETRY_KEYS)
    if found is None:
        return None
    table, rpath = found
    attempts = get_integer(r, table, "attempts", rpath, 0, MAX_RETRY_ATTEMPTS, None)
    if attempts is None and "attempts" not in table:
        r.problem(f"{rpath}.attempts", "required key is missing")
    per_try = r.duration(table, "per_try_timeout", rpath, None)
    retry_on: list[str] = []
    if "retry_on" in table:
        listed = r.get(table, "retry_on", rpath, list)
        if listed is not None and not listed:
            r.problem(f"{rpath}.retry_on", "empty: nothing would be retried")
        for item in listed or []:
            text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
            if not isinstance(text, str) or not (text in RETRY_CONDITIONS
                                                 or text in GRPC_RETRY_CONDITIONS
                                                 or _STATUS_RE.match(text)):
                r.problem(f"{rpath}.retry_on",
                          f"unknown condition {item!r} (expected one of: "
                          f"{', '.join(RETRY_CONDITIONS)}, a status such as \"503\", or a "
                          f"gRPC status: {', '.join(GRPC_RETRY_CONDITIONS)})")
            elif text not in retry_on:
                retry_on.append(text)
    if attempts is None:
        return None
    if retry_on:
        return RetryPolicy(attempts, per_try, tuple(retry_on))
    return RetryPolicy(attempts, per_try)


def _fault(r: Reader, raw: Mapping[str, Any], path: str) -> FaultPolicy | None:
    found = get_table(r, raw, "fault", path, FAULT_KEYS)
    if found is None:
        return None
    table, fpath = found
    delay = r.duration(table, "delay", fpath, None)
    delay_percent = get_number(r, table, "delay_percent", fpath, 0, 100, None)
    status = get_integer(r, table, "abort_status", fpath, 200, 599, None)
    abort_percent = get_number(r, table, "abort_percent", fpath, 0, 100, None)
    if "delay" not in table and "abort_status" not in table:
        r.problem(fpath, "expected delay or abort_status (or both)")
    if "delay_percent" in table and "delay" not in table:
        r.problem(f"{fpath}.delay_percent", "delay_percent without a delay")
    if "abort_percent" in table and "abort_status" not in table:
        r.problem(f"{fpath}.abort_percent", "abort_percent without an abort_status")
    return FaultPolicy(
        delay, (100.0 if delay_percent is None else delay_percent) if delay else 0.0,
        status, (100.0 if abort_percent is None else abort_percent) if status else 0.0)


def _mirror(r: Reader, raw: Mapping[str, Any], path: str,
            known: set[str]) -> MirrorPolicy | None:
    found = get_table(r, raw, "mirror", path, MIRROR_KEYS)
    if found is None:
        return None
    table, mpath = found
    subset = r.name(table, "subset", mpath)
    percent = get_number(r, table, "percent", mpath, 0, 100, 100.0)
    if subset is not None and subset not in known:
        hint = f" (declared: {', '.join(sorted(known))})" if known else \
            " (declare it under subsets)"
        r.problem(f"{mpath}.subset", f"unknown subset {subset!r}{hint}")
        return None
    if subset is None or percent is None:
        return None
    return MirrorPolicy(subset, percent)


# -- back to data -------------------------------------------------------------------------------

def routes_to_data(table: RouteTable) -> dict[str, Any]:
    """The canonical mapping form of a route table (what is stored in the registry's KV as
    JSON); ``parse_routes(routes_to_data(t)) == t``. Keys at their defaults are left out."""
    out: dict[str, Any] = {}
    for d in table.destinations:
        entry: dict[str, Any] = {}
        if d.subsets:
            entry["subsets"] = {s.name: _subset_data(s) for s in d.subsets}
        if d.split:
            entry["split"] = _split_data(d.split)
        if d.timeout is not None:
            entry["timeout"] = d.timeout
        _actions_data(entry, d.retries, d.fault, d.mirror)
        if d.routes:
            entry["routes"] = [_route_data(i, route) for i, route in enumerate(d.routes)]
        policy = policy_data(d.policy)
        if policy:
            entry["policy"] = policy
        if d.authorization is not None:
            entry["authorization"] = authorization_data(d.authorization)
        _edge_data(entry, d.rate_limit, d.request_headers, d.response_headers)
        if d.external is not None:
            entry["external"] = external_data(d.external)
        out[d.service] = entry
    data: dict[str, Any] = {"destinations": out}
    if table.default_policy is not DefaultPolicy.DENY:
        data["default_policy"] = table.default_policy.value
    if table.cleared:
        data["clear"] = True
    if table.egress is not EgressMode.REGISTERED_ONLY:
        data["egress"] = table.egress.value
    return data


def _subset_data(subset: Subset) -> dict[str, Any]:
    data: dict[str, Any] = {"version": subset.version}
    if subset.failover:
        data["failover"] = list(subset.failover)
    return data


def _split_data(split: tuple[SplitLeg, ...]) -> dict[str, int]:
    return {leg.subset: leg.weight for leg in split}


def _actions_data(entry: dict[str, Any], retries: RetryPolicy | None,
                  fault: FaultPolicy | None, mirror: MirrorPolicy | None) -> None:
    if retries is not None:
        rdata: dict[str, Any] = {"attempts": retries.attempts,
                                 "retry_on": list(retries.retry_on)}
        if retries.per_try_timeout is not None:
            rdata["per_try_timeout"] = retries.per_try_timeout
        entry["retries"] = rdata
    if fault is not None:
        fdata: dict[str, Any] = {}
        if fault.delay is not None:
            fdata["delay"] = fault.delay
            fdata["delay_percent"] = fault.delay_percent
        if fault.abort_status is not None:
            fdata["abort_status"] = fault.abort_status
            fdata["abort_percent"] = fault.abort_percent
        entry["fault"] = fdata
    if mirror is not None:
        entry["mirror"] = {"subset": mirror.subset, "percent": mirror.percent}


def _route_data(index: int, route: Route) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if route.name != _generated_name(index):
        entry["name"] = route.name
    match = match_data(route.match)
    if match:
        entry["match"] = match
    if route.split is not None:
        entry["split"] = _split_data(route.split)
    if route.timeout is not None:
        entry["timeout"] = route.timeout
    _actions_data(entry, route.retries, route.fault, route.mirror)
    _edge_data(entry, route.rate_limit, route.request_headers, route.response_headers)
    if route.rewrite is not None:
        entry["rewrite"] = rewrite_data(route.rewrite)
    if route.redirect is not None:
        entry["redirect"] = redirect_data(route.redirect)
    return entry


def _edge_data(entry: dict[str, Any], rate_limit: RateLimit | None,
               request_headers: HeaderEdits | None,
               response_headers: HeaderEdits | None) -> None:
    if rate_limit is not None:
        entry["rate_limit"] = rate_limit_data(rate_limit)
    if request_headers is not None:
        entry["request_headers"] = header_edits_data(request_headers)
    if response_headers is not None:
        entry["response_headers"] = header_edits_data(response_headers)
