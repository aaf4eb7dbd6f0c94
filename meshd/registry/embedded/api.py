"""What every endpoint group of the embedded registry shares: the state, the datacenter check,
ACL resolution and ``?filter=`` compilation. No I/O."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshd.httpd import Request, Response
from meshd.registry.embedded.acl import AclConfig, AclResolver, Authorizer
from meshd.registry.embedded.filter import FilterSchema, compile_filter
from meshd.registry.embedded.http import Route, parse_bool_param
from meshd.registry.embedded.state import RegistryState
from meshd.registry.embedded.store.records import ApiError, Mutation, Node
from meshd.registry.embedded.store.sessions import SESSION_TTL_MIN

KV_MAX_VALUE = 512 * 1024
T = TypeVar("T")


@dataclass(frozen=True)
class ApiSettings:
    datacenter: str = "dc1"
    acl: AclConfig = field(default_factory=AclConfig)
    session_ttl_min: float = SESSION_TTL_MIN


FILTERED_HEADER = "X-Consul-Results-Filtered-By-ACLs"


def mark_filtered(headers: list[tuple[str, str]]) -> None:
    if (FILTERED_HEADER, "true") not in headers:
        headers.append((FILTERED_HEADER, "true"))


def empty_response(_: Mutation) -> Response:
    return Response(200, b"", [])


def route(path: str, **methods: Any) -> Route:
    """``/v1/x/*``: a prefix route whose rest is the endpoint's argument."""
    return Route(path.rstrip("*"), path.endswith("*"), methods)


class ApiBase(ABC):
    def __init__(self, state: RegistryState, settings: ApiSettings) -> None:
        self.state = state
        self.settings = settings
        self.datacenter = settings.datacenter
        self.acl = AclResolver(settings.acl, state)

    @property
    def node(self) -> Node:
        found = self.state.node
        assert found is not None, "the registry is not booted"
        return found

    @abstractmethod
    def routes(self) -> list[Route]:
        """The endpoints this group serves (each subclass: agent, catalog, KV, the rest)."""

    def _common(self, request: Request) -> None:
        dc = request.param("dc")
        if dc and dc != self.datacenter:
            raise ApiError(500, "No path to datacenter")

    @staticmethod
    def _arg(tail: str, what: str) -> str:
        if not tail:
            raise ApiError(400, f"Missing {what}")
        return tail

    def authz(self, request: Request) -> Authorizer:
        return self.acl.authorize(request)

    @staticmethod
    def acl_filter(authz: Authorizer, items: Iterable[T], may_read: Callable[[T], bool],
                   headers: list[tuple[str, str]]) -> list[T]:
        """Drop what the token may not read, as Consul's list endpoints do (200, never 403).
        When something was dropped and the request named a token, say so in
        ``X-Consul-Results-Filtered-By-ACLs`` (Consul hides it from the anonymous token)."""
        items = list(items)
        kept = [item for item in items if may_read(item)]
        if len(kept) != len(items) and authz.token_given:
            mark_filtered(headers)
        return kept

    @staticmethod
    def predicate(request: Request, schema: FilterSchema) -> Callable[[Any], bool] | None:
        expression = request.param("filter")
        if not expression:
            return None
        return compile_filter(expression, schema)

    @staticmethod
    def filtered(items: Iterable[T], predicate: Callable[[Any], bool] | None,
                 view: Callable[[T], Any] = lambda x: x) -> list[T]:
        items = list(items)
        if predicate is None:
            return items
        return [item for item in items if predicate(view(item))]

    @staticmethod
    def passing_param(request: Request) -> bool:
        passing = parse_bool_param(request.param("passing", "false") or "")
        if passing is None:
            raise ApiError(400, "Invalid value for ?passing")
        return passing

    @staticmethod
    def enable_param(request: Request) -> bool:
        raw = request.param("enable")
        if raw is None:
            raise ApiError(400, "Missing value for enable")
        value = parse_bool_param(raw) if raw else None
        if value is None:
            raise ApiError(400, f'Invalid value for enable: "{raw}"')
        return value
