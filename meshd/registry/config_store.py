"""The mesh config in the registry's KV: the one place that knows its key (``ROUTES_KEY``), its
encoding, and how it is written. ``meshd routes``, ``meshd up``, the console and every meshd's
watcher go through here.

What is written is always the canonical form, ``json.dumps(routes_to_data(table),
sort_keys=True)`` of a validated table, so the same table always gives the same bytes and every
meshd can parse it. Every write names the ModifyIndex it was based on (check-and-set); if the key
moved meanwhile nothing is written and ``ConfigConflict`` says from which index to which, with the
value now stored, so the caller can show it: two operators never overwrite each other silently.

``RouteConfigStore`` is async over a ``KV`` (meshd's one Consul adapter, httpx, or a KV in
memory), so it runs under trio (the CLI, ``meshd up``) and asyncio (the console) alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from meshd.config.routes import parse_routes, routes_to_data
from meshd.config.schema import RouteTable
from meshd.errors import ConfigError, MeshError, Problem
from meshd.registry.consul import Blocking

ROUTES_KEY = "meshd/config/routes"


def encode_routes(table: RouteTable) -> bytes:
    """The canonical bytes stored in KV for a route table."""
    return json.dumps(routes_to_data(table), sort_keys=True).encode()


def _json_object(raw: bytes, source: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError([Problem(source, "", f"invalid JSON: {exc}")]) from exc
    if not isinstance(data, dict):
        raise ConfigError([Problem(source, "", "expected a JSON object")])
    return data


def decode_routes(raw: bytes, source: str = f"registry kv {ROUTES_KEY}") -> RouteTable:
    """Parse the canonical JSON route table stored in KV (raises ConfigError with reasons)."""
    return parse_routes(_json_object(raw, source), source)


@dataclass(frozen=True)
class Refused:
    """Why a meshd does not apply what the registry holds; the table in force stays.
    ``code``: ``missing``, ``empty`` or ``invalid``."""

    code: str
    reason: str


def judge_stored(raw: bytes | None, source: str = f"registry kv {ROUTES_KEY}",
                 ) -> RouteTable | Refused:
    """What a meshd makes of the stored value (None: the key is absent). Pure.

    Fail closed: a missing key, a table without destinations or one that does not validate
    never replaces the table in force; only an operator's `meshd routes clear` (a table marked
    ``clear``) empties it."""
    if raw is None:
        return Refused("missing", f"{source} is missing from the registry; the route table in "
                       "force stays (an operator empties it with `meshd routes clear`)")
    try:
        table = decode_routes(raw, source)
    except ConfigError as exc:
        return Refused("invalid", str(exc))
    if not table.destinations and not table.cleared:
        return Refused("empty", f"{source} holds a table without destinations; the route table "
                       "in force stays (an operator empties it with `meshd routes clear`)")
    return table


class KV(Protocol):
    """What the store needs of a registry: one key read, one check-and-set write."""

    @property
    def base_url(self) -> str: ...

    async def kv_get(self, key: str) -> Blocking: ...

    async def kv_put(self, key: str, value: bytes, *, cas: int | None = None) -> bool: ...


@dataclass(frozen=True)
class StoredRoutes:
    """The route table stored in KV and its ModifyIndex (0: the key does not exist, which means
    an empty table)."""

    table: RouteTable
    modify_index: int

    @property
    def data(self) -> dict[str, Any]:
        """The table in its canonical mapping form."""
        return routes_to_data(self.table)


class ConfigConflict(MeshError):
    """The key moved between our read and our write: nothing was written."""

    def __init__(self, key: str, expected: int, current: StoredRoutes | None,
                 current_error: ConfigError | None = None) -> None:
        self.key = key
        self.expected = expected
        self.current = current
        self.current_error = current_error
        moved_to = current.modify_index if current is not None else "?"
        super().__init__(
            f"conflict: {key} changed while this command ran (ModifyIndex {expected} -> "
            f"{moved_to}); who changed what is unknown. Nothing was written.")


class RouteConfigStore:
    def __init__(self, client: KV, key: str = ROUTES_KEY) -> None:
        self.client = client
        self.key = key

    @property
    def source(self) -> str:
        return f"registry kv {self.key}"

    async def current_index(self) -> int:
        """The key's ModifyIndex (0 when absent), whatever its value."""
        answer = await self.client.kv_get(self.key)
        return answer.data.modify_index if answer.data is not None else 0

    async def read(self) -> StoredRoutes:
        """The stored table; ``ConfigError`` when the stored value is not a valid table."""
        answer = await self.client.kv_get(self.key)
        if answer.data is None:
            return StoredRoutes(RouteTable(), 0)
        return StoredRoutes(decode_routes(answer.data.value, self.source),
                            answer.data.modify_index)

    async def peek(self) -> tuple[dict[str, Any] | None, int]:
        """What is stored as a JSON object, not validated (None: absent, or not a JSON object),
        and its ModifyIndex: a console shows even a table every meshd refuses."""
        answer = await self.client.kv_get(self.key)
        if answer.data is None:
            return None, 0
        try:
            data: dict[str, Any] | None = _json_object(answer.data.value, self.source)
        except ConfigError:
            data = None
        return data, answer.data.modify_index

    async def write(self, table: RouteTable, cas: int) -> StoredRoutes:
        """Store ``table`` if the key's ModifyIndex is still ``cas`` (0: only if absent).
        Returns what is stored afterwards; raises ``ConfigConflict`` if the key moved, and
        ``ConfigError`` for a table without destinations that is not marked ``clear`` (every
        meshd would refuse it)."""
        if not table.destinations and not table.cleared:
            raise ConfigError([Problem(self.source, "destinations", "no destinations: every "
                                       "meshd would refuse the table and keep its own; empty "
                                       "the table on purpose with `meshd routes clear`")])
        if await self.client.kv_put(self.key, encode_routes(table), cas=cas):
            return StoredRoutes(table, await self.current_index())
        try:
            current: StoredRoutes | None = await self.read()
            error = None
        except ConfigError as exc:
            current, error = StoredRoutes(RouteTable(), await self.current_index()), exc
        raise ConfigConflict(self.key, cas, current, error)

    async def apply(self, table: RouteTable) -> StoredRoutes:
        """Replace the stored table (whatever it was) with ``table``, unless it changes between
        our read of its index and our write."""
        return await self.write(table, await self.current_index())

    async def clear(self) -> StoredRoutes:
        """Empty the table on purpose: every meshd applies it (no routes, no rules; services
        then follow ``default_policy = "deny"``)."""
        return await self.apply(RouteTable(cleared=True))

    async def set_split(self, service: str, weights: Mapping[str, int]) -> tuple[StoredRoutes,
                                                                                 StoredRoutes]:
        """Change one destination's split; returns (before, after). The result is validated
        like a routes.toml (unknown subsets, weights not summing to 100 are refused)."""
        before = await self.read()
        data = before.data
        destination = data["destinations"].get(service)
        if destination is None:
            known = ", ".join(sorted(data["destinations"])) or "none"
            raise ConfigError([Problem(self.source, f"destinations.{service}",
                                       f"no such destination in the route table (known: "
                                       f"{known}); declare it and its subsets in routes.toml "
                                       "and apply that")])
        destination["split"] = dict(weights)
        table = parse_routes(data, f"set-split {service}")
        return before, await self.write(table, before.modify_index)
