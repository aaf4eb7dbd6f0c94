"""A route's edge features on one request, pure: header edits, rewrites, redirect locations,
and ``apply_route_edits`` deciding between a 429, a redirect and an edited request."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.config.routes import parse_routes
from meshd.config.schema import HeaderEdits, Redirect, Route
from meshd.proxy.core.edge import RATE_LIMITED_CODE, apply_route_edits
from meshd.proxy.core.http1 import Framing, RequestHead
from meshd.proxy.core.matcher import RequestFacts, select_route
from meshd.proxy.core.ratelimit import RateLimits
from meshd.proxy.core.rewrite import edit_headers, redirect_location, rewrite_target

HEADERS = ((b"Host", b"shop"), (b"X-Keep", b"1"), (b"X-Dup", b"a"), (b"x-dup", b"b"),
           (b"X-Gone", b"z"))


@pytest.mark.parametrize(("edits", "expected"), [
    (HeaderEdits(), list(HEADERS)),
    (HeaderEdits(add=(("x-dup", "c"),)), [*HEADERS, (b"x-dup", b"c")]),
    (HeaderEdits(set=(("x-dup", "c"),)),
     [(b"Host", b"shop"), (b"X-Keep", b"1"), (b"X-Gone", b"z"), (b"x-dup", b"c")]),
    (HeaderEdits(remove=("x-gone", "x-dup")), [(b"Host", b"shop"), (b"X-Keep", b"1")]),
    (HeaderEdits(add=(("x-new", "n"),), set=(("x-keep", "2"),), remove=("x-gone",)),
     [(b"Host", b"shop"), (b"X-Dup", b"a"), (b"x-dup", b"b"), (b"x-keep", b"2"),
      (b"x-new", b"n")]),
])
def test_edit_headers(edits: HeaderEdits, expected: list[tuple[bytes, bytes]]) -> None:
    assert edit_headers(HEADERS, edits) == expected


@pytest.mark.parametrize(("target", "matched", "new", "expected"), [
    (b"/api/users?id=1", "/api/", "/v2/", b"/v2/users?id=1"),
    (b"/api/users", "/api", "/", b"/users"),  # one slash dropped, not //users
    (b"/api", "/api", "/", b"/"),
    (b"/api/", "/api/", "/", b"/"),
    (b"/apix", "/api", "/v2", b"/v2x"),  # a prefix is a string prefix, as the match is
    (b"/old/a/b?q=/old/", "/old/", "/new/", b"/new/a/b?q=/old/"),  # the query untouched
])
def test_rewrite_target(target: bytes, matched: str, new: str, expected: bytes) -> None:
    assert rewrite_target(target, matched, new) == expected


@pytest.mark.parametrize(("redirect", "target", "host", "matched", "expected"), [
    (Redirect(scheme="https"), "/pay?x=1", "shop:8080", None, "https://shop/pay?x=1"),
    (Redirect(scheme="https", port=8443), "/pay", "shop:8080", None, "https://shop:8443/pay"),
    (Redirect(host="new.example"), "/pay", "shop:8080", None, "http://new.example:8080/pay"),
    (Redirect(port=80), "/", "shop:8080", None, "http://shop/"),  # default port not written
    (Redirect(path="/moved"), "/pay?x=1", "shop", None, "http://shop/moved?x=1"),
    (Redirect(path="/moved?y=2"), "/pay?x=1", "shop", None, "http://shop/moved?y=2"),
    (Redirect(prefix="/v2/"), "/v1/pay?x=1", "shop", "/v1/", "http://shop/v2/pay?x=1"),
    (Redirect(scheme="https"), "/", "[::1]:8080", None, "https://[::1]/"),
    (Redirect(port=9000), "/", "[::1]:8080", None, "http://[::1]:9000/"),
    (Redirect(path="/b"), "http://other:81/a?q", "shop", None, "http://other:81/b?q"),
])
def test_redirect_location(redirect: Redirect, target: str, host: str, matched: str | None,
                           expected: str) -> None:
    assert redirect_location(redirect, target, host, matched) == expected


def _head(target: bytes, *headers: tuple[bytes, bytes]) -> RequestHead:
    return RequestHead(b"GET", target, "1.1", ((b"host", b"payments"), *headers), True,
                       Framing.NONE)


def _route(target: bytes, routes: list[dict[str, Any]], **dest: Any) -> Route:
    table = parse_routes({"destinations": {"payments": {"routes": routes, **dest}}})
    route = select_route(table.get("payments"), RequestFacts("GET", target.decode()))
    assert route is not None
    return route


def test_a_route_without_edge_features_leaves_the_request_alone() -> None:
    route = _route(b"/x", [{"name": "plain", "timeout": "1s"}])
    assert apply_route_edits(route, _head(b"/x"), limits=RateLimits(), destination="payments",
                             source="web", now=0.0, default_host="payments") is None
    assert apply_route_edits(None, _head(b"/x"), limits=RateLimits(), destination="payments",
                             source="web", now=0.0, default_host="payments") is None


def test_rate_limit_answers_429_with_retry_after_until_a_token_comes_back() -> None:
    route = _route(b"/x", [], rate_limit={"requests_per_second": 0.5, "burst": 2})
    limits = RateLimits()

    def at(now: float) -> int:
        edge = apply_route_edits(route, _head(b"/x"), limits=limits, destination="payments",
                                 source="web", now=now, default_host="payments")
        assert edge is not None
        if edge.answer is None:
            return 200
        headers = dict(edge.answer.headers)
        assert edge.answer.code == RATE_LIMITED_CODE
        assert headers[b"x-meshd-error"] == b"rate-limited"
        return int(headers[b"retry-after"])

    assert [at(0.0), at(0.0), at(0.0), at(0.5), at(2.0), at(2.0)] == [200, 200, 2, 2, 200, 2]


def test_redirect_is_answered_with_location_and_response_header_edits() -> None:
    route = _route(b"/old/a?q=1", [{
        "name": "moved", "match": {"path": {"prefix": "/old/"}},
        "redirect": {"status": 308, "scheme": "https", "prefix": "/new/"},
        "response_headers": {"set": {"cache-control": "no-store"}}}])
    edge = apply_route_edits(route, _head(b"/old/a?q=1"), limits=RateLimits(),
                             destination="payments", source="web", now=0.0,
                             default_host="payments")
    assert edge is not None and edge.answer is not None
    assert edge.answer.status == 308
    assert dict(edge.answer.headers) == {b"location": b"https://payments/new/a?q=1",
                                         b"cache-control": b"no-store"}


def test_headers_and_rewrites_edit_the_request_forwarded() -> None:
    route = _route(b"/api/users?id=1", [{
        "name": "api", "match": {"path": {"prefix": "/api/"}},
        "request_headers": {"add": {"x-via": "mesh"}, "set": {"x-env": "prod"},
                            "remove": ["x-debug"]},
        "response_headers": {"remove": ["server"]},
        "rewrite": {"prefix": "/v2/", "host": "api.internal"}}])
    request = _head(b"/api/users?id=1", (b"X-Debug", b"1"), (b"x-env", b"dev"))
    edge = apply_route_edits(route, request, limits=RateLimits(), destination="payments",
                             source="web", now=0.0, default_host="payments")
    assert edge is not None and edge.answer is None
    assert edge.request.target == b"/v2/users?id=1"
    assert list(edge.request.headers) == [(b"host", b"api.internal"), (b"x-env", b"prod"),
                                          (b"x-via", b"mesh")]
    assert edge.response is not None
    assert edge.response([(b"server", b"app"), (b"x-a", b"1")]) == [(b"x-a", b"1")]
