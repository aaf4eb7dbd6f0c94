"""``meshd explain SERVICE``: how a running meshd would route one request, and why.

It reads the route table and endpoints in force from the daemon's admin ``/v1/state`` (through
the one admin client: over mutual TLS with ``--ca``, ``--cert``, ``--key``, as ``meshd status``)
and prints what the pure explanation in ``meshd.explain`` makes of them: which route matched and
why, the split, the candidate endpoints per subset (``meshd.explain.route``), and the verdict of
the destination's authorization rules on the caller (``meshd.explain.authz``). The caller is
``--source``, or else the asked host's one local service that has SERVICE as an upstream.

Exit status: 0 when the request would be sent to an endpoint (and, as far as known, let in), 1
when it would be answered by meshd itself (no healthy endpoint, fault abort for every request,
or a 403 from the destination's meshd: denied by its rules), 2 when the admin API cannot be read
or an option is malformed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from meshd.admin.client import AdminError
from meshd.cli.admin_api import add_admin_options, failure_line, read_state, signer_line
from meshd.errors import ConfigError, MeshError
from meshd.explain.route import explain, render
from meshd.names import NAME_RULE, is_valid_name
from meshd.proxy.core.matcher import RequestFacts

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
    add_admin_options(p, timeout_help="how long to wait for the admin API (default: 3)")
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
        state = read_state(args, required=("routes",))
    except AdminError as exc:
        print(f"meshd explain: {failure_line(exc)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except MeshError as exc:
        print(f"meshd explain: {exc}", file=sys.stderr)
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
    print(signer_line(state))
    return EXIT_ROUTED if found.reaches_app else EXIT_NOT_ROUTED
