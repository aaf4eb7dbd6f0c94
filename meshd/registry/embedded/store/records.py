"""The embedded registry's records and the write-ahead unit they travel in.

Records are frozen dataclasses, one per stored object (node, service, check, KV entry). A write is
planned as a ``Mutation``: the index it is written at plus a list of ``Op`` (put or delete one
record). The same ops are applied to memory and appended to the on-disk log, so a replay after a
restart goes through exactly the code that applied them the first time. JSON codecs for the log
live here too, next to the fields they must keep in step with.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from meshd.errors import RegistryError

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
CHECK_STATUSES = (PASSING, WARNING, CRITICAL)


class ApiError(RegistryError):
    """A request the registry refuses: answered with ``status`` and the plain-text ``text``."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def record_key(node: str, ident: str) -> str:
    """The table key of a service or check: its ID on the registry's own node (``node == ""``),
    ``<node>\x1f<ID>`` on a node registered through the catalog."""
    return ident if not node else f"{node}\x1f{ident}"


@dataclass(frozen=True)
class Node:
    id: str
    name: str
    address: str
    datacenter: str
    tagged_addresses: dict[str, str] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    agent: bool = True  # the registry's own node; False for nodes added by catalog/register
    create_index: int = 0
    modify_index: int = 0


@dataclass(frozen=True)
class Service:
    """A service instance as the agent holds it (Go names live in the decoder and renderer)."""

    id: str
    name: str
    tags: tuple[str, ...] = ()
    address: str = ""
    port: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    tagged_addresses: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: tuple[int, int] = (1, 1)  # (Passing, Warning)
    enable_tag_override: bool = False
    kind: str = ""
    proxy: dict[str, Any] | None = None  # Go-named, normalised by the decoder
    connect: dict[str, Any] | None = None
    socket_path: str = ""
    locality: dict[str, str] | None = None
    agent: bool = True  # False for catalog-only entries (the `consul` service, other nodes)
    node: str = ""  # "" = the registry's own node, else a node added by catalog/register
    create_index: int = 0
    modify_index: int = 0

    @property
    def key(self) -> str:
        return record_key(self.node, self.id)


@dataclass(frozen=True)
class Check:
    """A health check. ``service_id == ""`` makes it a node-level check."""

    id: str
    name: str
    status: str = CRITICAL
    notes: str = ""
    output: str = ""
    service_id: str = ""
    type: str = ""  # ttl, http, tcp, udp, grpc, h2ping, alias, "" (serfHealth)
    ttl: float = 0.0  # seconds
    interval: float = 0.0
    timeout: float = 0.0
    deregister_critical_after: float = 0.0
    output_max_size: int = 4096
    definition: dict[str, Any] = field(default_factory=dict)  # HTTP, TCP, Header... for runners
    agent: bool = True  # False for serfHealth and other nodes: not listed by /v1/agent/checks
    node: str = ""  # as Service.node
    create_index: int = 0
    modify_index: int = 0

    @property
    def key(self) -> str:
        return record_key(self.node, self.id)

    @property
    def service_key(self) -> str:
        return record_key(self.node, self.service_id) if self.service_id else ""


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: bytes = b""
    flags: int = 0
    lock_index: int = 0
    session: str = ""
    create_index: int = 0
    modify_index: int = 0


SESSION_RELEASE, SESSION_DELETE = "release", "delete"


@dataclass(frozen=True)
class Session:
    """A session (docs/consul-api.md §9.1).
    Its TTL timer and the lock delays it leaves behind live in
    memory only, as in Consul."""

    id: str
    name: str = ""
    node: str = ""  # as Service.node
    lock_delay: float = 15.0  # seconds
    behavior: str = SESSION_RELEASE
    ttl: float = 0.0  # seconds; 0: no TTL
    node_checks: tuple[str, ...] = ()
    service_checks: tuple[str, ...] = ()
    create_index: int = 0
    modify_index: int = 0


@dataclass(frozen=True)
class AclPolicy:
    """An ACL policy (docs/consul-api.md §1.5); ``rules`` is the text as written."""

    id: str
    name: str
    description: str = ""
    rules: str = ""
    datacenters: tuple[str, ...] = ()
    hash: str = ""
    create_index: int = 0
    modify_index: int = 0


@dataclass(frozen=True)
class AclToken:
    """An ACL token; ``policies`` are policy IDs (names are resolved when shown, as in Consul)."""

    accessor_id: str
    secret_id: str
    description: str = ""
    policies: tuple[str, ...] = ()
    local: bool = False
    create_time: str = ""
    hash: str = ""
    create_index: int = 0
    modify_index: int = 0


@dataclass(frozen=True)
class AclBootstrap:
    """Present once ACLs are bootstrapped; ``reset_index`` is the index of the bootstrap."""

    reset_index: int
    create_index: int = 0
    modify_index: int = 0


Table = Literal["node", "service", "check", "kv", "session", "acl-policy", "acl-token",
                "acl-meta"]
Record = Node | Service | Check | KVEntry | Session | AclPolicy | AclToken | AclBootstrap


@dataclass(frozen=True)
class Op:
    """Put ``value`` under ``key`` in ``table``, or delete the key when ``value`` is None."""

    table: Table
    key: str
    value: Record | None


@dataclass(frozen=True)
class Mutation:
    """A planned write: apply it (after logging it) or answer ``result`` without writing.

    ``index`` is 0 when there is nothing to write. ``ttl_resets`` lists TTL checks whose timer
    restarts, ``ttl_clears`` those whose timer stops (it fired) and ``session_resets`` the TTL
    sessions renewed; timers live in memory only, so they are not part of the logged ops.
    """

    index: int = 0
    ops: tuple[Op, ...] = ()
    ttl_resets: tuple[str, ...] = ()
    ttl_clears: tuple[str, ...] = ()
    session_resets: tuple[str, ...] = ()
    result: Any = None


# --- JSON codec for the log and snapshots -------------------------------------------------------

_TYPES: dict[str, type[Record]] = {
    "node": Node, "service": Service, "check": Check, "kv": KVEntry, "session": Session,
    "acl-policy": AclPolicy, "acl-token": AclToken, "acl-meta": AclBootstrap,
}
_TUPLE_FIELDS = {"tags", "weights", "node_checks", "service_checks", "datacenters", "policies"}


def record_to_json(record: Record) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def record_from_json(table: str, data: Mapping[str, Any]) -> Record:
    cls = _TYPES.get(table)
    if cls is None:
        raise RegistryError(f"unknown table {table!r}")
    kwargs: dict[str, Any] = {}
    try:
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name == "value" and cls is KVEntry:
                value = base64.b64decode(value, validate=True)
            elif f.name in _TUPLE_FIELDS:
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"bad {table} record: {exc}") from exc


def op_to_json(op: Op) -> list[Any]:
    return [op.table, op.key, None if op.value is None else record_to_json(op.value)]


def op_from_json(data: Any) -> Op:
    if not (isinstance(data, list) and len(data) == 3 and isinstance(data[1], str)):
        raise RegistryError(f"bad op {data!r:.80}")
    table, key, value = data
    if table not in _TYPES:
        raise RegistryError(f"unknown table {table!r}")
    if value is not None and not isinstance(value, dict):
        raise RegistryError(f"bad {table} record for {key!r}")
    return Op(table, key, None if value is None else record_from_json(table, value))
