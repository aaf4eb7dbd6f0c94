"""Route matching: table tests over the pure matcher, first match wins."""

from __future__ import annotations

import pytest

from meshd.config.routes import parse_routes
from meshd.config.schema import DestinationRoutes
from meshd.proxy.core.matcher import RequestFacts, explain_route, select_route


def _dest(routes: list[dict[str, object]], **top: object) -> DestinationRoutes:
    table = parse_routes({"destinations": {"payments": {
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "split": {"v1": 100}, "timeout": "3s", "routes": routes, **top}}})
    dest = table.get("payments")
    assert dest is not None
    return dest


ROUTES: list[dict[str, object]] = [
    {"name": "exact", "match": {"path": {"exact": "/health"}}},
    {"name": "admin-write", "match": {"path": {"prefix": "/admin"}, "method": ["POST", "PUT"]}},
    {"name": "regex", "match": {"path": {"regex": "/orders/[0-9]+"}}},
    {"name": "canary", "match": {"headers": {"X-Canary": "1"}}},
    {"name": "beta", "match": {"headers": {"x-user": {"prefix": "beta-"}}}},
    {"name": "tracked", "match": {"headers": {"x-trace": {"regex": "[a-f0-9]{8}"}}}},
    {"name": "debug", "match": {"query": {"debug": {"present": True}}}},
    {"name": "region", "match": {"query": {"region": "eu"}, "headers": {"x-internal":
                                                                       {"absent": True}}}},
]


@pytest.mark.parametrize(("method", "target", "headers", "expected"), [
    ("GET", "/health", [], "exact"),
    ("GET", "/health/deep", [], "default"),  # exact is exact
    ("POST", "/admin/users", [], "admin-write"),
    ("GET", "/admin/users", [], "default"),  # method not in the list
    ("PUT", "/adminx", [], "admin-write"),  # a prefix is a string prefix
    ("GET", "/orders/123", [], "regex"),
    ("GET", "/orders/123/items", [], "default"),  # a regex must match the whole path
    ("GET", "/x", [("x-canary", "1")], "canary"),  # header names are case-insensitive
    ("GET", "/x", [("X-CANARY", "2")], "default"),
    ("GET", "/x", [("x-user", "beta-42")], "beta"),
    ("GET", "/x", [("x-user", "gamma-42")], "default"),
    ("GET", "/x", [("x-trace", "deadbeef")], "tracked"),
    ("GET", "/x", [("x-trace", "deadbeef0")], "default"),
    ("GET", "/x?debug", [], "debug"),
    ("GET", "/x?debug=&a=1", [], "debug"),
    ("GET", "/x?region=eu", [], "region"),
    ("GET", "/x?region=eu", [("x-internal", "yes")], "default"),  # absent failed
    ("GET", "/x?region=us&region=eu", [], "default"),  # the first value counts
    ("GET", "/health", [("x-canary", "1")], "exact"),  # first match wins
])
def test_first_matching_route_wins(method: str, target: str, headers: list[tuple[str, str]],
                                   expected: str) -> None:
    dest = _dest(ROUTES)
    route = select_route(dest, RequestFacts(method, target, headers))
    assert route is not None and route.name == expected


def test_repeated_header_matches_joined_values() -> None:
    dest = _dest([{"name": "both", "match": {"headers": {"x-tag": "a,b"}}}])
    facts = RequestFacts("GET", "/", [("x-tag", "a"), ("X-Tag", "b")])
    route = select_route(dest, facts)
    assert route is not None and route.name == "both"


def test_facts_from_a_parsed_head() -> None:
    facts = RequestFacts.from_head(b"GET", b"/a/b?q=1&q=2", [(b"Host", b"x"), (b"X-A", b"1")])
    assert (facts.method, facts.path, facts.query, facts.header("x-a")) == \
        ("GET", "/a/b", {"q": "1"}, "1")


def test_routes_inherit_split_timeout_and_retries_not_fault_or_mirror() -> None:
    dest = _dest([
        {"name": "plain", "match": {"path": {"prefix": "/plain"}}},
        {"name": "own", "match": {"path": {"prefix": "/own"}}, "split": {"v2": 100},
         "timeout": "1s", "retries": {"attempts": 1}},
    ], retries={"attempts": 3}, fault={"abort_status": 503, "abort_percent": 1},
        mirror={"subset": "v2"})
    plain = select_route(dest, RequestFacts("GET", "/plain"))
    assert plain is not None
    assert plain.split == dest.split and plain.timeout == 3.0
    assert plain.retries is not None and plain.retries.attempts == 3
    assert plain.fault is None and plain.mirror is None
    own = select_route(dest, RequestFacts("GET", "/own"))
    assert own is not None and own.timeout == 1.0 and own.retries is not None
    assert own.retries.attempts == 1
    default = select_route(dest, RequestFacts("GET", "/else"))
    assert default is not None and default.fault is not None and default.mirror is not None


def test_explain_reports_every_check() -> None:
    dest = _dest(ROUTES)
    reports = explain_route(dest, RequestFacts("GET", "/admin/x", [("x-canary", "1")]))
    by_name = {r.route.name: r for r in reports}
    admin = by_name["admin-write"]
    assert [(c.condition, c.passed) for c in admin.checks] == [
        ("path prefix '/admin'", True), ("method in POST, PUT", False)]
    assert by_name["canary"].chosen and by_name["canary"].matched
    assert not by_name["default"].chosen
    assert sum(r.chosen for r in reports) == 1


def test_a_backtracking_bomb_matches_in_linear_time() -> None:
    """``/(a+)+`` against ``/aaaa…!`` takes Python's ``re`` about 2**n steps (seconds at n = 28,
    years at n = 60); RE2 answers at once, so one route cannot stall every request on a meshd."""
    dest = _dest([{"name": "bomb", "match": {"path": {"regex": "/(a+)+"}}},
                  {"name": "header-bomb", "match": {"headers": {"x-a": {"regex": "(a|aa)+$"}}}}])
    path = "/" + "a" * 60 + "!"
    assert select_route(dest, RequestFacts("GET", path, [("x-a", "a" * 60 + "!")])).name \
        == "default"
    assert select_route(dest, RequestFacts("GET", "/" + "a" * 60)).name == "bomb"
    assert select_route(dest, RequestFacts("GET", "/b", [("x-a", "a" * 60)])).name \
        == "header-bomb"
