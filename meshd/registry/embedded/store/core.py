"""The embedded registry's tables and indexes, and the one ``apply`` that changes them.

Pure code, no I/O and no trio. The registry's own node holds the agent's services and checks
(record ``node == ""``); other nodes come from ``catalog/register`` and key their services and
checks as ``<node>\\x1f<ID>`` (``record_key``). Writes are planned elsewhere (the ``store``
mixins) as ``Mutation`` objects and applied here; ``apply(mutation, now)`` returns a ``Wake``: the
topics whose blocking watchers must re-run their query.

Topics: ``services``, ``checks``, ``nodes``, ``sessions`` (tables), ``svc:<name>`` (per service
name), ``connect:<name>`` (proxies fronting a name), ``agent-service:<key>`` (hash blocking); KV
changes are reported as keys, matched against watched keys and prefixes by the shell.

Timers (TTL deadlines, how long a check has been critical, session TTLs, lock delays) are memory
only and restart from the restart time, as a restarted Consul agent does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from meshd.registry.embedded.store.kv import KVStore
from meshd.registry.embedded.store.records import (
    CRITICAL,
    SESSION_DELETE,
    AclBootstrap,
    AclPolicy,
    AclToken,
    ApiError,
    Check,
    Mutation,
    Node,
    Op,
    Record,
    Service,
    Session,
    record_key,
)

REAP_MINIMUM = 60.0  # DeregisterCriticalServiceAfter values below this are raised to it
SESSION_TTL_MULTIPLIER = 2  # a TTL session is invalidated 2 x TTL after its last renewal
TABLES = ("nodes", "services", "checks", "sessions", "acl")


@dataclass
class Wake:
    topics: set[str] = field(default_factory=set)
    kv_keys: set[str] = field(default_factory=set)


def proxy_destination(service: Service) -> str:
    if service.kind != "connect-proxy" or not service.proxy:
        return ""
    return str(service.proxy.get("DestinationServiceName") or "")


def same(old: Record, new: Record) -> bool:
    """Equal apart from the Raft indexes."""
    return replace(new, create_index=old.create_index, modify_index=old.modify_index) == old


class StateCore:
    def __init__(self, *, reap_minimum: float = REAP_MINIMUM) -> None:
        self.index = 0
        self.agent_node = ""  # the registry's own node name (its records say node == "")
        self.nodes: dict[str, Node] = {}
        self.services: dict[str, Service] = {}  # by record key
        self.checks: dict[str, Check] = {}  # by record key
        self.sessions: dict[str, Session] = {}
        self.kv = KVStore()
        self.acl_policies: dict[str, AclPolicy] = {}  # by ID
        self.acl_tokens: dict[str, AclToken] = {}  # by AccessorID
        self.acl_secrets: dict[str, str] = {}  # SecretID -> AccessorID
        self.acl_bootstrap: AclBootstrap | None = None
        self.table_index = dict.fromkeys(TABLES, 0)
        self.svc_index: dict[str, int] = {}
        self.names_removed_index = 0
        # Connect: per destination name, the index of the last change to any proxy fronting it
        self.connect_index: dict[str, int] = {}
        self._proxy_dests: dict[str, set[str]] = {}  # proxy service name -> destinations
        self._by_name: dict[str, set[str]] = {}  # service name -> service keys
        self._service_checks: dict[str, set[str]] = {}  # service key -> check keys
        self._node_checks: dict[str, set[str]] = {}  # node ("" = own) -> node-level check keys
        self.reap_minimum = reap_minimum
        self._ttl_deadline: dict[str, float] = {}
        self._critical_since: dict[str, float] = {}
        self._session_deadline: dict[str, float] = {}

    # --- nodes -----------------------------------------------------------------------------------

    @property
    def node(self) -> Node | None:
        """The registry's own node."""
        return self.nodes.get(self.agent_node)

    def node_name(self, node: str) -> str:
        """A record's ``node`` field as a node name."""
        return node or self.agent_node

    def node_key(self, name: str) -> str | None:
        """A node name as records store it ("" for the own node), None when unknown."""
        if name == self.agent_node:
            return ""
        return name if name in self.nodes else None

    def node_record(self, node: str) -> Node:
        found = self.nodes.get(self.node_name(node))
        if found is None:
            raise ApiError(500, f"missing node {self.node_name(node)!r}")
        return found

    def sorted_nodes(self) -> list[Node]:
        return [self.nodes[n] for n in sorted(self.nodes)]

    # --- reads -----------------------------------------------------------------------------------

    def _order(self, record: Service | Check) -> tuple[str, str]:
        return self.node_name(record.node), record.id

    def instances(self, name: str) -> list[Service]:
        return sorted((self.services[k] for k in self._by_name.get(name, ())), key=self._order)

    def service_names(self) -> list[str]:
        return sorted(n for n, keys in self._by_name.items() if keys)

    def node_services(self, node: str) -> list[Service]:
        return sorted((s for s in self.services.values() if s.node == node), key=self._order)

    def checks_of(self, service_key: str) -> list[Check]:
        return sorted((self.checks[c] for c in self._service_checks.get(service_key, ())),
                      key=self._order)

    def node_checks(self, node: str = "") -> list[Check]:
        return sorted((self.checks[c] for c in self._node_checks.get(node, ())), key=self._order)

    def sorted_checks(self, checks: Iterable[Check]) -> list[Check]:
        return sorted(checks, key=self._order)

    def owner(self, check: Check) -> Service | None:
        return self.services.get(check.service_key) if check.service_id else None

    def service_index(self, name: str) -> int:
        return max(1, self.svc_index.get(name, self.names_removed_index))

    def connect_instances(self, destination: str) -> list[Service]:
        """The ``connect-proxy`` instances fronting ``destination`` (health/catalog connect)."""
        out = [s for name, dests in self._proxy_dests.items() if destination in dests
               for s in self.instances(name) if proxy_destination(s) == destination]
        return sorted(out, key=self._order)

    def connect_service_index(self, destination: str) -> int:
        return max(1, self.connect_index.get(destination, self.names_removed_index))

    def table(self, *names: str) -> int:
        return max(1, *(self.table_index[n] for n in names))

    # --- planning helpers ------------------------------------------------------------------------

    def session_destroy_ops(self, session_id: str, index: int) -> list[Op]:
        """Invalidate a session: drop it, and release (or delete) every key it holds."""
        session = self.sessions.get(session_id)
        if session is None:
            return []
        ops = [Op("session", session_id, None)]
        for key in sorted(self.kv.by_session.get(session_id, ())):
            entry = self.kv.entries[key]
            if session.behavior == SESSION_DELETE:
                ops.append(Op("kv", key, None))
            else:
                ops.append(Op("kv", key, replace(entry, session="", modify_index=index)))
        return ops

    def mutation(self, index: int, ops: Iterable[Op], **extra: Any) -> Mutation:
        """Wrap planned ops, adding the invalidation of every session that depends on a check
        turning critical or going away, or on a node going away (Consul does this in the same
        transaction)."""
        ops = list(ops)
        doomed: set[str] = set()
        removed = {op.key for op in ops if op.table == "session" and op.value is None}
        for op in ops:
            if op.table == "check" and (op.value is None or (
                    isinstance(op.value, Check) and op.value.status == CRITICAL)):
                doomed.update(sid for sid, s in self.sessions.items()
                              if op.key in self._session_check_keys(s))
            elif op.table == "node" and op.value is None:
                node = self.node_key(op.key)
                doomed.update(sid for sid, s in self.sessions.items() if s.node == node)
        for session_id in sorted(doomed - removed):
            ops.extend(self.session_destroy_ops(session_id, index))
        return Mutation(index=index if ops else 0, ops=tuple(ops), **extra)

    @staticmethod
    def _session_check_keys(session: Session) -> set[str]:
        return {record_key(session.node, c) for c in (*session.node_checks,
                                                      *session.service_checks)}

    # --- apply -----------------------------------------------------------------------------------

    def apply(self, mutation: Mutation, now: float | None = None) -> Wake:
        """Apply a planned (or replayed, ``now=None``) mutation; returns who to wake."""
        wake = Wake()
        index = mutation.index
        if mutation.ops:
            if index <= self.index:
                raise ApiError(500, f"index {index} does not follow {self.index}")
            self.index = index
        touched: set[str] = set()
        for op in mutation.ops:
            if op.table == "kv":
                self.kv.apply(op, index)
                wake.kv_keys.add(op.key)
            elif op.table == "node":
                self._apply_node(op, index, wake, touched)
            elif op.table == "service":
                self._apply_service(op, index, wake, touched)
            elif op.table == "session":
                self._apply_session(op, index, wake, now)
            elif op.table in ("acl-policy", "acl-token", "acl-meta"):
                self._apply_acl(op, index, wake)
            else:
                self._apply_check(op, index, wake, touched, now)
        self._reindex_names(touched, index, wake)
        if now is not None:
            self._apply_timers(mutation, now)
        return wake

    def _apply_timers(self, mutation: Mutation, now: float) -> None:
        for check_id in mutation.ttl_clears:
            self._ttl_deadline.pop(check_id, None)
        for check_id in mutation.ttl_resets:
            check = self.checks.get(check_id)
            if check is not None and check.type == "ttl":
                self._ttl_deadline[check_id] = now + check.ttl
        for session_id in mutation.session_resets:
            session = self.sessions.get(session_id)
            if session is not None and session.ttl > 0:
                self._session_deadline[session_id] = now + SESSION_TTL_MULTIPLIER * session.ttl

    def _reindex_names(self, touched: set[str], index: int, wake: Wake) -> None:
        for name in touched:
            dests = {d for d in map(proxy_destination, self.instances(name)) if d}
            for dest in dests | self._proxy_dests.get(name, set()):
                self.connect_index[dest] = index
                wake.topics.add(f"connect:{dest}")
            if dests:
                self._proxy_dests[name] = dests
            else:
                self._proxy_dests.pop(name, None)
            if self._by_name.get(name):
                self.svc_index[name] = index
            else:
                self._by_name.pop(name, None)
                self.svc_index.pop(name, None)
                self.names_removed_index = index
            wake.topics.add(f"svc:{name}")

    def _bump(self, wake: Wake, index: int, table: str) -> None:
        self.table_index[table] = index
        wake.topics.add(table)

    def _names_on(self, node: str) -> set[str]:
        return {s.name for s in self.services.values() if s.node == node}

    def _apply_node(self, op: Op, index: int, wake: Wake, touched: set[str]) -> None:
        old = self.nodes.pop(op.key, None)
        if old is not None:
            touched.update(self._names_on("" if old.agent else old.name))
        if op.value is not None:
            assert isinstance(op.value, Node)
            self.nodes[op.key] = op.value
            if op.value.agent:
                self.agent_node = op.value.name
            touched.update(self._names_on("" if op.value.agent else op.value.name))
        self._bump(wake, index, "nodes")

    def _apply_service(self, op: Op, index: int, wake: Wake, touched: set[str]) -> None:
        old = self.services.pop(op.key, None)
        if old is not None:
            self._by_name.get(old.name, set()).discard(op.key)
            touched.add(old.name)
        if op.value is not None:
            assert isinstance(op.value, Service)
            self.services[op.key] = op.value
            self._by_name.setdefault(op.value.name, set()).add(op.key)
            touched.add(op.value.name)
        self._bump(wake, index, "services")
        wake.topics.add(f"agent-service:{op.key}")
        if self._service_checks.get(op.key):
            self._bump(wake, index, "checks")  # their ServiceName/ServiceTags changed

    def _apply_check(
        self, op: Op, index: int, wake: Wake, touched: set[str], now: float | None
    ) -> None:
        old = self.checks.pop(op.key, None)
        for check in (old, op.value):
            if not isinstance(check, Check):
                continue
            owner = self.owner(check)
            if owner is not None:
                touched.add(owner.name)
            elif not check.service_id:
                touched.update(self._names_on(check.node))  # part of every health entry there
        if old is not None:
            self._node_checks.get(old.node, set()).discard(op.key)
            if old.service_id:
                self._service_checks.get(old.service_key, set()).discard(op.key)
        new = op.value
        if new is None:
            self._ttl_deadline.pop(op.key, None)
            self._critical_since.pop(op.key, None)
        else:
            assert isinstance(new, Check)
            self.checks[op.key] = new
            if new.service_id:
                self._service_checks.setdefault(new.service_key, set()).add(op.key)
            else:
                self._node_checks.setdefault(new.node, set()).add(op.key)
            if now is not None:
                if new.status != CRITICAL:
                    self._critical_since.pop(op.key, None)
                elif old is None or old.status != CRITICAL:
                    self._critical_since[op.key] = now
        self._bump(wake, index, "checks")

    def _apply_session(self, op: Op, index: int, wake: Wake, now: float | None) -> None:
        old = self.sessions.pop(op.key, None)
        if op.value is None:
            self._session_deadline.pop(op.key, None)
            if old is not None and now is not None and old.lock_delay > 0:
                for key in self.kv.by_session.get(op.key, ()):
                    self.kv.lock_delay[key] = now + old.lock_delay
        else:
            assert isinstance(op.value, Session)
            self.sessions[op.key] = op.value
            if old is None and now is not None and op.value.ttl > 0:
                self._session_deadline[op.key] = now + SESSION_TTL_MULTIPLIER * op.value.ttl
        self._bump(wake, index, "sessions")

    def _apply_acl(self, op: Op, index: int, wake: Wake) -> None:
        if op.table == "acl-policy":
            if op.value is None:
                self.acl_policies.pop(op.key, None)
            else:
                assert isinstance(op.value, AclPolicy)
                self.acl_policies[op.key] = op.value
        elif op.table == "acl-token":
            old = self.acl_tokens.pop(op.key, None)
            if old is not None:
                self.acl_secrets.pop(old.secret_id, None)
            if op.value is not None:
                assert isinstance(op.value, AclToken)
                self.acl_tokens[op.key] = op.value
                self.acl_secrets[op.value.secret_id] = op.key
        else:
            assert op.value is None or isinstance(op.value, AclBootstrap)
            self.acl_bootstrap = op.value
        self._bump(wake, index, "acl")

    # --- timers ----------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest TTL check or TTL session deadline."""
        return min((*self._ttl_deadline.values(), *self._session_deadline.values()),
                   default=None)

    def restart_timers(self, now: float) -> None:
        """After loading from disk: every timer starts again at ``now``."""
        self._ttl_deadline = {
            c.key: now + c.ttl for c in self.checks.values()
            if c.type == "ttl" and c.status != CRITICAL
        }
        self._critical_since = {c.key: now for c in self.checks.values() if c.status == CRITICAL}
        self._session_deadline = {
            s.id: now + SESSION_TTL_MULTIPLIER * s.ttl for s in self.sessions.values() if s.ttl > 0
        }

    # --- snapshots -------------------------------------------------------------------------------

    def records(self) -> list[Op]:
        """Every stored record as a put op (nodes first, services before their checks)."""
        ops: list[Op] = [Op("node", k, v) for k, v in sorted(self.nodes.items())]
        ops.extend(Op("service", k, v) for k, v in sorted(self.services.items()))
        ops.extend(Op("check", k, v) for k, v in sorted(self.checks.items()))
        ops.extend(Op("session", k, v) for k, v in sorted(self.sessions.items()))
        ops.extend(Op("kv", k, v) for k, v in sorted(self.kv.entries.items()))
        ops.extend(Op("acl-policy", k, v) for k, v in sorted(self.acl_policies.items()))
        ops.extend(Op("acl-token", k, v) for k, v in sorted(self.acl_tokens.items()))
        if self.acl_bootstrap is not None:
            ops.append(Op("acl-meta", "bootstrap", self.acl_bootstrap))
        return ops

    def indexes(self) -> dict[str, Any]:
        return {
            "index": self.index, "tables": dict(self.table_index),
            "services": dict(self.svc_index), "names_removed": self.names_removed_index,
            "connect": dict(self.connect_index),
            "kv": self.kv.table_index, "tombstones": dict(self.kv.tombstones),
        }

    def restore(self, records: Iterable[Op], indexes: Mapping[str, Any]) -> None:
        """Load a snapshot into an empty state."""
        for op in records:
            self.apply(Mutation(index=self.index + 1, ops=(op,)))
        self.index = int(indexes["index"])
        self.table_index = dict.fromkeys(TABLES, 0)
        self.table_index.update({k: int(v) for k, v in indexes["tables"].items()})
        self.svc_index = {k: int(v) for k, v in indexes["services"].items()}
        self.names_removed_index = int(indexes["names_removed"])
        self.connect_index = {k: int(v) for k, v in indexes.get("connect", {}).items()}
        self.kv.table_index = int(indexes["kv"])
        self.kv.tombstones = {k: int(v) for k, v in indexes["tombstones"].items()}

