"""Which route of a destination a request takes: the first whose every condition holds. Pure.

``RequestFacts`` is what a match may look at (method, path, query parameters, headers), built
from a parsed request head, or by ``meshd explain`` from its arguments; the path and query are
split out of the target once, and the header map only when a route tests a header. The proxy
calls ``select_route``; ``explain_route`` runs the very same conditions one by one to say why
each route did or did not match.

Semantics, as Envoy and Istio have them: a path ``prefix`` is a plain string prefix (``/api``
also matches ``/apix``), ``regex`` must match the whole value, ``exact`` is case-sensitive.
A header present several times is tested as its values joined with ``,``; a query parameter
present several times is tested by its first value. Nothing is percent-decoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import parse_qsl

from meshd.config.schema import (
    DestinationRoutes,
    FieldMatch,
    MatchKind,
    Route,
    RouteMatch,
    StringMatch,
)


class RequestFacts:
    """The parts of a request routes can test. ``headers`` keep their original names; they
    are looked up case-insensitively."""

    def __init__(self, method: str, target: str, headers: Iterable[tuple[str, str]] = (),
                 source: str = "") -> None:
        self.method = method
        self.target = target
        self._raw_headers = headers
        self.source = source  # the client's address (ring_hash on source)
        path, _, query = target.partition("?")
        self.path = path
        self.query_string = query

    @classmethod
    def from_head(cls, method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]],
                  source: str = "") -> RequestFacts:
        return cls(method.decode("latin-1"), target.decode("latin-1"),
                   _Latin1Headers(headers), source)

    @cached_property
    def headers(self) -> Mapping[str, str]:
        """Lower-case name -> values joined with ``,`` (in order)."""
        merged: dict[str, list[str]] = {}
        for name, value in self._raw_headers:
            merged.setdefault(name.lower(), []).append(value)
        return {name: ",".join(values) for name, values in merged.items()}

    @cached_property
    def query(self) -> Mapping[str, str]:
        """Parameter -> its first value."""
        out: dict[str, str] = {}
        for name, value in parse_qsl(self.query_string, keep_blank_values=True):
            out.setdefault(name, value)
        return out

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class _Latin1Headers:
    """Byte headers decoded only when iterated (i.e. when some route tests a header)."""

    def __init__(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self._headers = headers

    def __iter__(self):  # type: ignore[no-untyped-def]
        for name, value in self._headers:
            yield name.decode("latin-1"), value.decode("latin-1")


def string_matches(match: StringMatch, value: str | None) -> bool:
    """Whether ``value`` (None: absent) passes ``match``."""
    kind = match.kind
    if kind is MatchKind.ABSENT:
        return value is None
    if value is None:
        return False
    if kind is MatchKind.PRESENT:
        return True
    if kind is MatchKind.EXACT:
        return value == match.value
    if kind is MatchKind.PREFIX:
        return value.startswith(match.value)
    assert match.pattern is not None
    return match.pattern.fullmatch(value) is not None


@dataclass(frozen=True)
class Check:
    """One condition of a route and whether a request passed it, in words."""

    condition: str
    passed: bool
    actual: str


def _describe(match: StringMatch) -> str:
    if match.kind in (MatchKind.PRESENT, MatchKind.ABSENT):
        return match.kind.value
    return f"{match.kind.value} {match.value!r}"


def _shown(value: str | None) -> str:
    return "absent" if value is None else repr(value[:120])


def _field_checks(kind: str, fields: Sequence[FieldMatch], lookup: Mapping[str, str],
                  ) -> Iterable[Check]:
    for f in fields:
        value = lookup.get(f.name)
        yield Check(f"{kind} {f.name} {_describe(f.match)}", string_matches(f.match, value),
                    _shown(value))


def checks(match: RouteMatch, facts: RequestFacts) -> Iterable[Check]:
    """Every condition of ``match`` in order (path, method, headers, query), evaluated; lazy,
    so ``route_matches`` stops at the first failure."""
    if match.path is not None:
        yield Check(f"path {_describe(match.path)}", string_matches(match.path, facts.path),
                    repr(facts.path[:120]))
    if match.methods:
        yield Check(f"method in {', '.join(match.methods)}", facts.method in match.methods,
                    facts.method)
    if match.headers:
        yield from _field_checks("header", match.headers, facts.headers)
    if match.query:
        yield from _field_checks("query", match.query, facts.query)


def route_matches(match: RouteMatch, facts: RequestFacts) -> bool:
    return all(check.passed for check in checks(match, facts))


def select_route(dest: DestinationRoutes | None, facts: RequestFacts) -> Route | None:
    """The route that serves the request, with what it leaves out filled in from the
    destination level: the first matching one, else the default route. None when the
    destination has no routing at all (any healthy instance, no timeout)."""
    if dest is None:
        return None
    for route in dest.routes:
        if route_matches(route.match, facts):
            return resolve(dest, route)
    return dest.default_route


def resolve(dest: DestinationRoutes, route: Route) -> Route:
    """``route`` with its ``split``/``timeout``/``retries`` inherited where it has none."""
    if route.split is not None and route.timeout is not None and route.retries is not None:
        return route
    # the constructor, not ``dataclasses.replace``: this runs per request, at under half the cost
    return Route(route.name, route.match,
                 route.split if route.split is not None else dest.split,
                 route.timeout if route.timeout is not None else dest.timeout,
                 route.retries if route.retries is not None else dest.retries,
                 route.fault, route.mirror, route.rate_limit, route.request_headers,
                 route.response_headers, route.rewrite, route.redirect)


@dataclass(frozen=True)
class RouteReport:
    """One route as ``meshd explain`` shows it: its checks and whether it was chosen."""

    route: Route
    checks: tuple[Check, ...]
    matched: bool
    chosen: bool


def explain_route(dest: DestinationRoutes, facts: RequestFacts) -> tuple[RouteReport, ...]:
    """Every route in order with all its checks (not only up to the first failure), marking
    the one ``select_route`` picks; the default route comes last."""
    chosen = select_route(dest, facts)
    reports = []
    for route in dest.routes:
        found = tuple(checks(route.match, facts))
        matched = all(c.passed for c in found)
        reports.append(RouteReport(route, found, matched,
                                   chosen is not None and chosen.name == route.name))
    default = dest.default_route
    reports.append(RouteReport(default, (), True,
                               chosen is not None and chosen.name == default.name))
    return tuple(reports)
