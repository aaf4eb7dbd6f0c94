"""Transport conventions of the Consul HTTP API, without I/O (docs/consul-api.md §1, §2).

Routing (405 with ``Allow``, OPTIONS, the 404 text), query options of blocking reads (``index``,
``wait``, consistency flags), the headers every answer carries, and the two kinds of endpoint
results the shell knows how to execute: a ``Read`` (maybe blocking) and a ``Write`` (planned,
logged, applied).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from meshd.durations import parse_go_duration
from meshd.httpd import Request, Response
from meshd.registry.embedded.state import RegistryState
from meshd.registry.embedded.store.records import ApiError, Mutation

DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
NOT_FOUND_TEXT = "Invalid URL path: not a recognized HTTP API endpoint\n"


@dataclass(frozen=True)
class Read:
    """An answer computed from the state, with what a blocking query needs to wait again."""

    response: Response
    index: int | None = None  # X-Consul-Index (blocking-capable reads only)
    topics: tuple[str, ...] = ()
    kv_key: str | None = None  # wake on a change of exactly this key
    kv_prefix: str | None = None  # wake on a change of any key under this prefix
    content_hash: str | None = None  # hash blocking (agent/service/:id)
    consistency: bool = False  # catalog/health: add X-Consul-Effective-Consistency


@dataclass(frozen=True)
class Write:
    """``plan(state, now)`` runs under the write lock against the current state; ``respond``
    shapes the answer once the mutation is durable and applied."""

    plan: Callable[[RegistryState, float], Mutation]
    respond: Callable[[Mutation], Response]


Kind = Literal["read", "write"]
Endpoint = Callable[[Request, str], Read | Write]


@dataclass(frozen=True)
class Route:
    path: str
    prefix: bool  # True: the rest of the path is the endpoint's argument (ID, name, key)
    methods: Mapping[str, Endpoint]

    @property
    def allow(self) -> str:
        return ",".join(["OPTIONS", *self.methods])


class Router:
    def __init__(self, routes: list[Route]) -> None:
        self._exact = {r.path: r for r in routes if not r.prefix}
        # longest prefix first, so /v1/agent/service/register beats /v1/agent/service/
        self._prefixes = sorted((r for r in routes if r.prefix), key=lambda r: -len(r.path))

    def match(self, path: str) -> tuple[Route, str] | None:
        route = self._exact.get(path)
        if route is not None:
            return route, ""
        for route in self._prefixes:
            if path.startswith(route.path):
                return route, path[len(route.path):]
        return None

    def dispatch(self, request: Request) -> Response | tuple[Endpoint, str]:
        """Either a finished answer (404, 405, OPTIONS) or the endpoint to run and its argument."""
        found = self.match(request.path)
        if found is None:
            return Response.text(NOT_FOUND_TEXT, 404)
        route, tail = found
        if request.method == "OPTIONS":
            return Response(200, b"", [("Allow", route.allow)])
        endpoint = route.methods.get(request.method)
        if endpoint is None:
            return Response.text(f"method {request.method} not allowed", 405,
                                 [("Allow", route.allow)])
        return endpoint, tail


@dataclass(frozen=True)
class QueryOptions:
    index: int | None  # None: answer at once
    wait: float
    hash: str | None
    consistency: str


def parse_uint(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) < 2**64 else None


def query_options(request: Request) -> QueryOptions:
    raw_index = request.param("index")
    index: int | None = None
    if raw_index:
        index = parse_uint(raw_index)
        if index is None:
            raise ApiError(400, "Invalid index")
        index = index or None
    wait = DEFAULT_WAIT
    raw_wait = request.param("wait")
    if raw_wait:
        parsed = parse_go_duration(raw_wait)
        if parsed is None or parsed < 0:
            raise ApiError(400, "Invalid wait time")
        wait = min(parsed, MAX_WAIT) if parsed > 0 else DEFAULT_WAIT
    stale, consistent = request.has_param("stale"), request.has_param("consistent")
    if stale and consistent:
        raise ApiError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
    max_stale = request.param("max_stale")
    if max_stale is not None and parse_go_duration(max_stale) is None:
        raise ApiError(400, f'Invalid max_stale value "{max_stale}"')
    consistency = "stale" if stale else "consistent" if consistent else "leader"
    return QueryOptions(index=index, wait=wait, hash=request.param("hash") or None,
                        consistency=consistency)


def must_block(read: Read, options: QueryOptions) -> bool:
    if options.hash is not None and read.content_hash is not None:
        return read.content_hash == options.hash
    if options.index is None or read.index is None:
        return False
    return max(1, read.index) <= options.index


def finish(read: Read, options: QueryOptions | None) -> Response:
    """The read's response with the index and consistency headers of §1.4."""
    response = read.response
    headers = list(response.headers)
    if read.index is not None:
        headers += [("X-Consul-Index", str(max(1, read.index))),
                    ("X-Consul-KnownLeader", "true"), ("X-Consul-LastContact", "0")]
    if read.consistency:
        headers.append(("X-Consul-Effective-Consistency",
                        options.consistency if options else "leader"))
    if read.content_hash is not None:
        headers.append(("X-Consul-ContentHash", read.content_hash))
    return Response(response.status, response.body, headers)


def with_common_headers(response: Response, default_policy: str = "allow") -> Response:
    """Every answer says the default ACL policy (docs/consul-api.md §1.4)."""
    return Response(response.status, response.body,
                    [*response.headers, ("X-Consul-Default-ACL-Policy", default_policy)])


def json_response(request: Request, obj: Any, status: int = 200) -> Response:
    return Response.json(obj, status, pretty=request.has_param("pretty"))


def error_response(exc: ApiError) -> Response:
    return Response.text(exc.text, exc.status)


def parse_bool_param(value: str) -> bool | None:
    """Go's strconv.ParseBool, with a bare flag (``?passing``) meaning true."""
    if value in ("", "1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    return None


def raw_query(request: Request) -> str:
    return request.target.partition("?")[2]
