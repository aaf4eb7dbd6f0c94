"""``meshd explain SERVICE``: how a running meshd would route one request, and why.

It reads the route table and endpoints in force from the daemon's admin ``/v1/state`` (through
the one admin client: over mutual TLS with ``--ca``, ``--cert``, ``--key``, as ``meshd status``)
and prints what the pure explanation in ``meshd.explain`` makes of them: which route matched and
why, the split, the candidate endpoints per subset (``meshd.explain.route``), and the verdict of
the destination's authorization rules on the caller (``meshd.explain.authz``). The caller is
``--source``, or else the asked host's one local service that has SERVICE as an upstream.

Exit status (``meshd.cli.exits``): 0 when the request would be sent to an endpoint (and, as far
as known, let in), 1 when it would be answered by meshd itself (no healthy endpoint, fault abort
for every request, or a 403 from the destination's meshd: denied by its rules), 2 when an option
is malformed, 3 when the admin API cannot be read (or its route table does not parse).

``-o json`` prints ``explanation_document``: the same decision as data.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from meshd.admin.client import AdminError
from meshd.cli import exits
from meshd.cli.admin_api import (
    add_admin_options,
    admin_base,
    demo_hint,
    failure_line,
    read_state,
    signer_line,
)
from meshd.cli.output import add_output_option, print_json, wants_json
from meshd.config.external import external_data
from meshd.config.gateway import GatewayRoute, request_host, route_for
from meshd.errors import ConfigError, MeshError
from meshd.explain.authz import AuthzCheck
from meshd.explain.route import Candidate, Explanation, SubsetView, explain, render
from meshd.names import NAME_RULE, is_valid_name
from meshd.proxy.core.matcher import RequestFacts
from meshd.registry.model import Endpoint

EXIT_ROUTED, EXIT_NOT_ROUTED, EXIT_UNREACHABLE = exits.OK, exits.FAILED, exits.UNREACHABLE
EXPLAIN_FORMAT = "meshd.explain/1"
USAGE = "meshd explain [SERVICE | --gateway NAME] [--method M] [--path P] [--header K=V] ..."


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "explain", help="show how a request to SERVICE would be routed and authorized, and why",
        description="Ask a running meshd (its admin /v1/state) which route a request to "
        "SERVICE matches, the split, the candidate endpoints with health, ejection and "
        "load, and whether SERVICE's authorization rules (enforced by its own meshd) let the "
        "caller in, naming the rule that decides. Exit 0 if it would reach an endpoint and "
        "be let in, 1 if not (no endpoint, fault abort, or a 403 from SERVICE's meshd), 3 if "
        "the admin API is unreachable. -o json prints the same as one object: {format, "
        "admin, service, request, generation, routes, route, policy, notes, subsets, "
        "authorization, routable, reaches_app, routes_signed, exit_code}.")
    p.add_argument("service", metavar="SERVICE", nargs="?",
                   help="the destination service (with --gateway: the one its routes pick)")
    p.add_argument("--gateway", metavar="NAME",
                   help="explain a request arriving at the asked host's ingress gateway NAME: "
                   "its routes pick SERVICE by the request's host (--header host=...) and "
                   "path, and the gateway is the calling service")
    p.add_argument("--method", default="GET", help="request method (default: GET)")
    p.add_argument("--path", default="/", help="request path, may carry ?query (default: /)")
    p.add_argument("--header", action="append", default=[], metavar="K=V",
                   help="a request header (repeatable)")
    p.add_argument("--source", metavar="SERVICE",
                   help="the calling service, whose identity (spiffe://TRUST_DOMAIN/svc/NAME) "
                   "the destination's meshd checks its authorization rules against (default: "
                   "the asked host's local service with the destination as an upstream, if "
                   "there is exactly one; else no verdict is shown)")
    add_admin_options(p, timeout_help="how long to wait for the admin API (default: 3)")
    add_output_option(p, what="the routes tried, the subsets and endpoints, the verdict")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    headers = []
    for item in args.header:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            print(f"meshd explain: --header {item!r}: expected NAME=VALUE", file=sys.stderr)
            return exits.USAGE
        headers.append((name.strip(), value))
    if args.service is None and args.gateway is None:
        print("meshd explain: name the destination SERVICE (or --gateway NAME)\n"
              f"usage: {USAGE}", file=sys.stderr)
        return exits.USAGE
    if args.source is not None and not is_valid_name(args.source):
        print(f"meshd explain: --source {args.source!r}: not a service name ({NAME_RULE})",
              file=sys.stderr)
        return exits.USAGE
    try:
        base, _ = admin_base(args)
        state = read_state(args, required=("routes",))
    except AdminError as exc:
        print(f"meshd explain: {failure_line(exc)}", file=sys.stderr)
        hint = demo_hint(f"meshd explain {args.service}", exc)
        if hint:
            print(f"meshd explain: {hint}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except MeshError as exc:  # options that cannot work: nothing was asked
        print(f"meshd explain: {exc}", file=sys.stderr)
        return exits.USAGE
    path = args.path if args.path.startswith("/") else "/" + args.path
    facts = RequestFacts(args.method.upper(), path, headers)
    source, service, entry = args.source, args.service, ""
    if args.gateway is not None:
        picked = gateway_route(state, args.gateway, facts)
        if isinstance(picked, str):
            print(f"meshd explain: {picked}", file=sys.stderr)
            return EXIT_NOT_ROUTED
        service, entry = picked
        source = args.gateway
        if args.service is not None and args.service != service:
            print(f"meshd explain: gateway {args.gateway} routes this request to {service}, "
                  f"not {args.service}", file=sys.stderr)
            return EXIT_NOT_ROUTED
    assert service is not None  # checked before asking
    try:
        found = explain(state, service, facts, source)
    except ConfigError as exc:
        print(f"meshd explain: the daemon's route table does not parse: {exc}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    code = EXIT_ROUTED if found.reaches_app else EXIT_NOT_ROUTED
    if wants_json(args):
        document = explanation_document(found, base, state, code)
        if entry:
            document["gateway"] = {"name": args.gateway, "route": entry}
        print_json(document, sys.stdout)
    else:
        if entry:
            print(f"gateway {args.gateway}: {entry}")
        print(render(found), end="")
        print(signer_line(state))
    return code


def gateway_route(state: Mapping[str, Any], name: str,
                  facts: RequestFacts) -> tuple[str, str] | str:
    """The service the host's gateway ``name`` sends a request to, and the route in words;
    or why there is none. Pure."""
    gateway = next((g for g in state.get("gateways") or () if g.get("name") == name), None)
    if gateway is None:
        known = ", ".join(g.get("name", "?") for g in state.get("gateways") or ()) or "none"
        return f"this host runs no gateway {name!r} (its gateways: {known})"
    routes = tuple(GatewayRoute(r["service"], tuple(r["hosts"]), r["path_prefix"])
                   for r in gateway.get("routes", ()))
    host = request_host(facts.header("host") or "")
    route = route_for(routes, host, facts.path.split("?", 1)[0])
    if route is None:
        return (f"gateway {name} has no route for host {host!r} and path {facts.path!r}: "
                "it answers 404")
    return route.service, (f"route hosts={list(route.hosts)} path_prefix={route.path_prefix} "
                           f"-> {route.service} (called as {name})")


# -- -o json (pure) -----------------------------------------------------------------------------

def explanation_document(found: Explanation, admin: str, state: Mapping[str, Any],
                         code: int) -> dict[str, Any]:
    """``meshd explain -o json``: the decision ``render`` shows, as data."""
    facts = found.facts
    route = found.route
    return {
        "format": EXPLAIN_FORMAT,
        "admin": admin,
        "service": found.service,
        "request": {"method": facts.method, "target": facts.target, "path": facts.path,
                    "headers": dict(facts.headers.items())},
        "generation": found.generation,
        "routes": [{"name": r.route.name, "matched": r.matched, "chosen": r.chosen,
                    "checks": [{"condition": c.condition, "passed": c.passed,
                                "actual": c.actual} for c in r.checks]}
                   for r in found.reports],
        "route": None if route is None else {
            "name": route.name, "timeout_seconds": route.timeout or None,
            "split": {leg.subset: leg.weight for leg in route.split or ()}},
        "policy": (None if found.dest is None
                   else {"load_balancer": found.dest.policy.load_balancer.value}),
        "notes": list(found.notes),
        "subsets": [_subset(s) for s in found.subsets],
        "authorization": _authorization(found.authz),
        "external": (external_data(found.dest.external)
                     if found.dest is not None and found.dest.external is not None else None),
        "egress": found.egress_mode.value,
        "routable": found.routable,
        "reaches_app": found.reaches_app,
        "routes_signed": state.get("routes_signed"),
        "exit_code": code,
    }


def _endpoint(e: Endpoint) -> dict[str, Any]:
    return {"key": e.key, "node": e.node, "instance_id": e.instance_id, "address": e.address,
            "port": e.port, "version": e.version, "healthy": e.healthy}


def _subset(s: SubsetView) -> dict[str, Any]:
    usable = {e.key for e in s.usable}

    def candidate(c: Candidate) -> dict[str, Any]:
        return {**_endpoint(c.endpoint), "usable": c.endpoint.key in usable,
                "ejected": c.ejected, "ejection_remaining_seconds": c.ejection_remaining,
                "ejections": c.ejections, "ejection_reason": c.ejection_reason,
                "active_requests": c.active,
                "ring_hash_pick": s.hashed_to is not None and s.hashed_to.key == c.endpoint.key}

    return {"name": s.name, "weight": s.weight, "version": s.version, "why": s.why,
            "panic": s.panic, "usable": len(s.usable),
            "endpoints": [candidate(c) for c in s.endpoints]}


def _authorization(c: AuthzCheck) -> dict[str, Any]:
    return {
        "destination": c.destination, "source": c.source, "source_note": c.source_note,
        "spiffe_id": c.spiffe_id or None, "method": c.method, "path": c.path,
        "rules": None if c.rules is None else [
            {"name": check.rule.name, "action": check.rule.action.value,
             "applies": check.applies} for check in c.rules],
        "verdict": None if c.verdict is None else {"allowed": c.verdict.allowed,
                                                  "rule": c.verdict.rule or None},
        "denied": c.denied,
    }
