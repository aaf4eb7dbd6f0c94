"""Sessions and the KV locks they hold (docs/consul-api.md §8.2 acquire/release, §9.1).

Pure. A session belongs to a node and depends on health checks of that node (``serfHealth`` by
default); it is invalidated when it is destroyed, when its TTL runs out (2 x TTL after the last
renewal, as Consul arms its timer), when one of its checks turns critical or goes away, or when
its node goes away (``StateCore.mutation`` adds those invalidations to the write that causes
them). Invalidation releases every key the session holds, or deletes it with ``Behavior:
delete``, and starts the lock delay of those keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshd.durations import format_go_duration, parse_go_duration
from meshd.registry.embedded.store.core import StateCore
from meshd.registry.embedded.store.decode import DecodeError, Schema
from meshd.registry.embedded.store.records import (
    CRITICAL,
    SESSION_DELETE,
    SESSION_RELEASE,
    ApiError,
    Mutation,
    Op,
    Session,
    record_key,
)

SERF_CHECK_ID = "serfHealth"
DEFAULT_LOCK_DELAY = 15.0
SESSION_TTL_MIN = 10.0
SESSION_TTL_MAX = 24 * 3600.0
LOCK_DELAY_SECONDS_BELOW = 1000  # a bare number under this is seconds, else nanoseconds

SESSION_SCHEMA = Schema(
    "structs.Session",
    {
        "ID": "str", "Name": "str", "Node": "str", "LockDelay": "any", "Behavior": "str",
        "TTL": "str", "NodeChecks": ("list", "str"), "Checks": ("list", "str"),
        "ServiceChecks": ("list", Schema("structs.ServiceCheck",
                                         {"ID": "str", "Namespace": "str"})),
        "Namespace": "str", "Partition": "str",
    },
)


def decode_lock_delay(value: Any) -> float:
    """Consul's lock-delay fix-up: a duration string, or a number of seconds (below 1000) or of
    nanoseconds."""
    if isinstance(value, str):
        seconds = parse_go_duration(value)
        if seconds is None:
            raise DecodeError(f'time: invalid duration "{value}"')
        return seconds
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodeError("json: cannot unmarshal LockDelay: expected a duration")
    return float(value) if value < LOCK_DELAY_SECONDS_BELOW else float(value) / 1e9


def session_json(state: StateCore, session: Session) -> dict[str, Any]:
    return {
        "ID": session.id, "Name": session.name, "Node": state.node_name(session.node),
        "LockDelay": round(session.lock_delay * 1e9), "Behavior": session.behavior,
        "TTL": format_go_duration(session.ttl) if session.ttl > 0 else "",
        "NodeChecks": list(session.node_checks),
        "ServiceChecks": ([{"ID": c, "Namespace": ""} for c in session.service_checks]
                          if session.service_checks else None),
        "CreateIndex": session.create_index, "ModifyIndex": session.modify_index,
    }


class SessionWrites(StateCore):
    def sorted_sessions(self) -> list[Session]:
        return sorted(self.sessions.values(), key=lambda s: (s.create_index, s.id))

    def plan_session_create(
        self, definition: Mapping[str, Any], session_id: str, *, ttl_min: float = SESSION_TTL_MIN
    ) -> Mutation:
        node_name = definition.get("Node") or self.agent_node
        node = self.node_key(node_name)
        if node is None:
            raise ApiError(500, "Missing node registration")
        behavior = definition.get("Behavior") or SESSION_RELEASE
        if behavior not in (SESSION_RELEASE, SESSION_DELETE):
            raise ApiError(500, f"Invalid Behavior setting '{behavior}'")
        ttl = self._parse_ttl(definition.get("TTL", ""), ttl_min)
        lock_delay = (decode_lock_delay(definition["LockDelay"]) if "LockDelay" in definition
                      else DEFAULT_LOCK_DELAY)
        if "NodeChecks" in definition:
            node_checks = list(definition["NodeChecks"])
        elif "Checks" in definition:
            node_checks = list(definition["Checks"])  # the legacy spelling
        else:
            node_checks = [SERF_CHECK_ID]
        service_checks = [c.get("ID", "") for c in definition.get("ServiceChecks", ())]
        for check_id in (*node_checks, *service_checks):
            check = self.checks.get(record_key(node, check_id))
            if check is None:
                raise ApiError(500, f"Missing check '{check_id}' registration")
            if check.status == CRITICAL:
                raise ApiError(500, f"Check '{check_id}' is in {CRITICAL} state")
        index = self.index + 1
        session = Session(
            id=session_id, name=definition.get("Name", ""), node=node, lock_delay=lock_delay,
            behavior=behavior, ttl=ttl, node_checks=tuple(node_checks),
            service_checks=tuple(service_checks), create_index=index, modify_index=index,
        )
        return Mutation(index=index, ops=(Op("session", session_id, session),),
                        result={"ID": session_id})

    @staticmethod
    def _parse_ttl(text: str, ttl_min: float) -> float:
        if not text:
            return 0.0
        ttl = parse_go_duration(text)
        if ttl is None:
            raise ApiError(500, f"Session TTL '{text}' invalid: time: invalid duration "
                                f'"{text}"')
        if ttl != 0 and not ttl_min <= ttl <= SESSION_TTL_MAX:
            raise ApiError(500, f"Invalid Session TTL '{round(ttl * 1e9)}', must be between "
                                f"[{format_go_duration(ttl_min)}="
                                f"{format_go_duration(SESSION_TTL_MAX)}]")
        return ttl

    def plan_session_destroy(self, session_id: str) -> Mutation:
        return self.mutation(self.index + 1, self.session_destroy_ops(session_id, self.index + 1),
                             result=True)

    def plan_session_renew(self, session_id: str) -> Mutation:
        session = self.sessions.get(session_id)
        if session is None:
            raise ApiError(404, f"Session id '{session_id}' not found")
        return Mutation(session_resets=(session_id,), result=session)

    def plan_session_expiry(self, now: float) -> Mutation:
        index = self.index + 1
        ops: list[Op] = []
        for session_id in sorted(s for s, t in self._session_deadline.items() if t <= now):
            ops.extend(self.session_destroy_ops(session_id, index))
        return self.mutation(index, ops)

    # --- KV writes that involve sessions ---------------------------------------------------------

    def require_session(self, session_id: str) -> None:
        if session_id not in self.sessions:
            raise ApiError(500, f'Invalid session "{session_id}"')

    def plan_kv_acquire(
        self, key: str, value: bytes, *, flags: int, session: str, now: float
    ) -> Mutation:
        self.require_session(session)
        return self.kv.plan_lock(key, value, flags=flags, session=session,
                                 index=self.index + 1, now=now)

    def plan_kv_release(self, key: str, value: bytes, *, flags: int, session: str) -> Mutation:
        """False unless ``session`` holds the key (an unknown session holds nothing)."""
        return self.kv.plan_unlock(key, value, flags=flags, session=session,
                                   index=self.index + 1)
