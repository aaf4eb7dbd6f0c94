"""A route's edge features applied to one request, in one call the forwarding shells make once
the route is chosen (``apply_route_edits``), and to the response (``ResponseEdits``). Pure.

In order: the route's ``rate_limit`` (over it: a 429 answered by meshd, with ``retry-after``
and ``x-meshd-error: rate-limited``); its ``redirect`` (answered by meshd with ``location``);
then the request as forwarded: ``request_headers`` edited, the path prefix and ``Host``
rewritten. ``response_headers`` edit the destination's response (and a redirect's answer).
Nothing here applies to meshd's own error answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from meshd.config.schema import HeaderEdits, MatchKind, Route
from meshd.proxy.core.attempt import ERROR_HEADER, REASON_HEADER
from meshd.proxy.core.http1 import Header, RequestHead, header_values
from meshd.proxy.core.ratelimit import RateLimits, limit_key, retry_after
from meshd.proxy.core.rewrite import (
    edit_headers,
    redirect_location,
    rewrite_target,
    set_host,
)

RATE_LIMITED_CODE = "rate-limited"  # x-meshd-error and the access log's error


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """An answer meshd gives itself instead of forwarding: ``code`` is its ``x-meshd-error``
    (``""``: not an error, a redirect)."""

    status: int
    text: str
    headers: tuple[Header, ...]
    code: str = ""


@dataclass(frozen=True, slots=True)
class Edge:
    """What ``apply_route_edits`` decided: forward ``request`` (edited) and edit the response
    with ``response`` (None: as it comes), or give ``answer`` instead."""

    request: RequestHead
    answer: LocalAnswer | None = None
    response: Callable[[list[Header]], list[Header]] | None = None


@dataclass(frozen=True, slots=True)
class ResponseEdits:
    """``response_headers`` as a callable on a response's (end-to-end) headers."""

    edits: HeaderEdits

    def __call__(self, headers: list[Header]) -> list[Header]:
        return edit_headers(headers, self.edits)


def has_edge(route: Route | None) -> bool:
    return route is not None and (
        route.rate_limit is not None or route.redirect is not None
        or route.request_headers is not None or route.response_headers is not None
        or route.rewrite is not None)


def apply_route_edits(route: Route | None, request: RequestHead, *, limits: RateLimits,
                      destination: str, source: str, now: float,
                      default_host: str) -> Edge | None:
    """The route's edge features on ``request`` (module doc); None when it has none (the
    request goes as it is). ``source`` keys ``rate_limit = { key = "source" }``;
    ``default_host`` stands for a missing ``Host`` in a redirect's ``location``."""
    if route is None or not has_edge(route):
        return None
    limit = route.rate_limit
    if limit is not None:
        key = limit_key(limit, source, lambda name: _header(request, name))
        wait = limits.take(destination, route.name, limit, key, now)
        if wait > 0:
            text = (f"rate limit of route {route.name} reached "
                    f"({limit.requests_per_second:g}/s, burst {limit.burst})")
            return Edge(request, LocalAnswer(429, text, (
                (b"retry-after", b"%d" % retry_after(wait)),
                (ERROR_HEADER, RATE_LIMITED_CODE.encode("ascii")),
                (REASON_HEADER, text.encode("ascii", "replace"))), RATE_LIMITED_CODE))
    response = ResponseEdits(route.response_headers) if route.response_headers else None
    matched = (route.match.path.value if route.match.path is not None
               and route.match.path.kind is MatchKind.PREFIX else None)
    if route.redirect is not None:
        host = _header(request, "host") or default_host
        location = redirect_location(route.redirect, request.target.decode("latin-1"), host,
                                     matched)
        headers: list[Header] = [(b"location", location.encode("latin-1"))]
        if response is not None:
            headers = response(headers)
        return Edge(request, LocalAnswer(route.redirect.status, f"redirecting to {location}",
                                         tuple(headers)))
    headers_in = request.headers
    target = request.target
    if route.request_headers is not None:
        headers_in = tuple(edit_headers(headers_in, route.request_headers))
    rewrite = route.rewrite
    if rewrite is not None:
        if rewrite.prefix is not None and matched is not None:
            target = rewrite_target(target, matched, rewrite.prefix)
        if rewrite.host is not None:
            headers_in = tuple(set_host(headers_in, rewrite.host))
    if headers_in is not request.headers or target is not request.target:
        request = replace(request, headers=headers_in, target=target)
    return Edge(request, None, response)


def _header(request: RequestHead, name: str) -> str | None:
    values = header_values(request.headers, name.encode("ascii"))
    return b",".join(values).decode("latin-1") if values else None
