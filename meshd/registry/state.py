"""The embedded registry's state core: one node, its services, checks and KV, with Consul's indexes.

Pure code, no I/O and no trio. Every write is two steps, so the shell can make it durable before
anyone sees it:

1. ``plan_*`` validates the request against the current state and returns a ``Mutation`` (the
   index it will be written at and the record puts/deletes), raising ``ApiError`` on refusal;
2. ``apply(mutation, now)`` changes memory and returns a ``Wake``: the topics whose blocking
   watchers must re-run their query.

Replaying the logged ops of the same mutations (``apply`` with ``now=None``) rebuilds the same
state, indexes included. Timers (TTL deadlines, how long a check has been critical) are memory
only and restart from the restart time, as a restarted Consul agent does.

Topics: ``services``, ``checks``, ``nodes`` (tables), ``svc:<name>`` (per-service-name index),
``agent-service:<id>`` (hash-blocking on one agent service); KV changes are reported as keys,
matched against watched keys and prefixes by the shell.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from meshd.registry.store_agent import (
    check_from_definition,
    service_from_definition,
    truncate_output,
)
from meshd.registry.store_kv import KVStore
from meshd.registry.store_records import (
    CHECK_STATUSES,
    CRITICAL,
    PASSING,
    ApiError,
    Check,
    Mutation,
    Node,
    Op,
    Record,
    Service,
)

CONSUL_VERSION = "1.22.0"
SERVER_RPC_PORT = 8300
SERF_CHECK_ID = "serfHealth"
REAP_MINIMUM = 60.0  # DeregisterCriticalServiceAfter values below this are raised to it


@dataclass
class Wake:
    topics: set[str] = field(default_factory=set)
    kv_keys: set[str] = field(default_factory=set)


def _unknown_service(service_id: str) -> ApiError:
    return ApiError(404, f'Unknown service ID "{service_id}". Ensure that the service ID is '
                         "passed, not the service name.")


def _unknown_check(check_id: str) -> ApiError:
    return ApiError(404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, '
                         "not the check name.")


def _proxy_destination(service: Service) -> str:
    if service.kind != "connect-proxy" or not service.proxy:
        return ""
    return str(service.proxy.get("DestinationServiceName") or "")


def _same(old: Record, new: Record) -> bool:
    """Equal apart from the Raft indexes."""
    return replace(new, create_index=old.create_index, modify_index=old.modify_index) == old


class RegistryState:
    def __init__(self, *, reap_minimum: float = REAP_MINIMUM) -> None:
        self.index = 0
        self.node: Node | None = None
        self.services: dict[str, Service] = {}
        self.checks: dict[str, Check] = {}
        self.kv = KVStore()
        self.table_index = {"nodes": 0, "services": 0, "checks": 0}
        self.svc_index: dict[str, int] = {}
        self.names_removed_index = 0
        # Connect: per destination name, the index of the last change to any proxy fronting it
        self.connect_index: dict[str, int] = {}
        self._proxy_dests: dict[str, set[str]] = {}  # proxy service name -> destinations
        self._by_name: dict[str, set[str]] = {}
        self._service_checks: dict[str, set[str]] = {}
        self._node_checks: set[str] = set()
        self.reap_minimum = reap_minimum
        self._ttl_deadline: dict[str, float] = {}
        self._critical_since: dict[str, float] = {}

    # --- reads -----------------------------------------------------------------------------------

    def instances(self, name: str) -> list[Service]:
        return [self.services[i] for i in sorted(self._by_name.get(name, ()))]

    def service_names(self) -> list[str]:
        return sorted(n for n, ids in self._by_name.items() if ids)

    def checks_of(self, service_id: str) -> list[Check]:
        return [self.checks[c] for c in sorted(self._service_checks.get(service_id, ()))]

    def node_checks(self) -> list[Check]:
        return [self.checks[c] for c in sorted(self._node_checks)]

    def service_index(self, name: str) -> int:
        return max(1, self.svc_index.get(name, self.names_removed_index))

    def connect_instances(self, destination: str) -> list[Service]:
        """The ``connect-proxy`` instances fronting ``destination`` (health/catalog connect)."""
        out = [s for name, dests in self._proxy_dests.items() if destination in dests
               for s in self.instances(name) if _proxy_destination(s) == destination]
        return sorted(out, key=lambda s: s.id)

    def connect_service_index(self, destination: str) -> int:
        return max(1, self.connect_index.get(destination, self.names_removed_index))

    def table(self, *names: str) -> int:
        return max(1, *(self.table_index[n] for n in names))

    # --- standing state (consul-api.md §3) -------------------------------------------------------

    def plan_boot(self, *, node_name: str, node_id: str, address: str, datacenter: str) -> Mutation:
        """Make sure the node, its serfHealth check and the `consul` service are as configured."""
        index = self.index + 1
        node = Node(
            id=node_id, name=node_name, address=address, datacenter=datacenter,
            tagged_addresses={"lan": address, "lan_ipv4": address, "wan": address,
                              "wan_ipv4": address},
            meta={"consul-network-segment": "", "consul-version": CONSUL_VERSION},
        )
        serf = Check(
            id=SERF_CHECK_ID, name="Serf Health Status", status=PASSING,
            output="Agent alive and reachable", agent=False,
        )
        consul = Service(
            id="consul", name="consul", port=SERVER_RPC_PORT, agent=False,
            meta={"version": CONSUL_VERSION, "raft_version": "3", "non_voter": "false",
                  "read_replica": "false", "serf_protocol_current": "2",
                  "serf_protocol_max": "5", "serf_protocol_min": "1", "grpc_port": "8502"},
        )
        ops = []
        for table, new, old in (
            ("node", node, self.node),
            ("service", consul, self.services.get("consul")),
            ("check", serf, self.checks.get(SERF_CHECK_ID)),
        ):
            if old is None or not _same(old, new):
                created = old.create_index if old is not None else index
                ops.append(Op(table, new.name if table == "node" else new.id,  # type: ignore[arg-type]
                              replace(new, create_index=created, modify_index=index)))
        return Mutation(index=index if ops else 0, ops=tuple(ops))

    # --- agent writes ----------------------------------------------------------------------------

    def plan_register_service(
        self, definition: Mapping[str, Any], *, replace_existing_checks: bool = False
    ) -> Mutation:
        service, checks = service_from_definition(definition)
        index = self.index + 1
        old = self.services.get(service.id)
        if old is not None and not old.agent:
            raise ApiError(400, f'Invalid service: ID "{service.id}" is reserved')
        ops: list[Op] = []
        new = replace(service, create_index=old.create_index if old else index,
                      modify_index=index)
        if old is None or not _same(old, new):
            ops.append(Op("service", service.id, new))
        resets = []
        declared = set()
        for check in checks:
            declared.add(check.id)
            existing = self.checks.get(check.id)
            if existing is not None and not existing.agent:
                raise ApiError(400, f'Invalid check: ID "{check.id}" is reserved')
            if existing is not None:
                check = replace(check, status=existing.status, output=existing.output,
                                create_index=existing.create_index)
            else:
                check = replace(check, create_index=index)
            check = replace(check, modify_index=index)
            if existing is None or not _same(existing, check):
                ops.append(Op("check", check.id, check))
            if check.type == "ttl":
                resets.append(check.id)
        if replace_existing_checks:
            stale = sorted(self._service_checks.get(service.id, set()) - declared)
            ops.extend(Op("check", c, None) for c in stale)
        return Mutation(index=index if ops else 0, ops=tuple(ops), ttl_resets=tuple(resets))

    def plan_deregister_service(self, service_id: str) -> Mutation:
        old = self.services.get(service_id)
        if old is None or not old.agent:
            raise _unknown_service(service_id)
        return self._plan_remove_services([service_id], self.index + 1)

    def _plan_remove_services(self, service_ids: Iterable[str], index: int) -> Mutation:
        ops: list[Op] = []
        for service_id in service_ids:
            checks = sorted(self._service_checks.get(service_id, ()))
            ops.extend(Op("check", c, None) for c in checks)
            ops.append(Op("service", service_id, None))
        return Mutation(index=index if ops else 0, ops=tuple(ops))

    def plan_register_check(self, definition: Mapping[str, Any]) -> Mutation:
        name = definition.get("Name", "")
        if not name:
            raise ApiError(400, "Missing check name")
        check_id = definition.get("CheckID") or definition.get("ID") or name
        service_id = definition.get("ServiceID", "")
        if service_id:
            owner = self.services.get(service_id)
            if owner is None or not owner.agent:
                raise ApiError(404, f'ServiceID "{service_id}" does not exist')
        status = definition.get("Status", "")
        if status and status not in CHECK_STATUSES:
            raise ApiError(400, "Bad check status")
        check = check_from_definition(definition, check_id=check_id, service_id=service_id,
                                      default_name=name)
        index = self.index + 1
        existing = self.checks.get(check_id)
        if existing is not None and not existing.agent:
            raise ApiError(400, f'Invalid check: ID "{check_id}" is reserved')
        if existing is not None:
            check = replace(check, status=existing.status, output=existing.output,
                            create_index=existing.create_index, modify_index=index)
        else:
            check = replace(check, create_index=index, modify_index=index)
        ops = () if existing is not None and _same(existing, check) else (Op("check", check_id,
                                                                               check),)
        resets = (check_id,) if check.type == "ttl" else ()
        return Mutation(index=index if ops else 0, ops=ops, ttl_resets=resets)

    def plan_deregister_check(self, check_id: str) -> Mutation:
        check = self.checks.get(check_id)
        if check is None or not check.agent:
            raise _unknown_check(check_id)
        return Mutation(index=self.index + 1, ops=(Op("check", check_id, None),))

    def plan_check_update(self, check_id: str, status: str, output: str) -> Mutation:
        """A TTL check's pass/warn/fail/update: new status and Output, timer restarted."""
        check = self.checks.get(check_id)
        if check is None or not check.agent:
            raise _unknown_check(check_id)
        if check.type != "ttl":
            raise ApiError(500, f'CheckID "{check_id}" does not have associated TTL')
        index = self.index + 1
        new = replace(check, status=status, output=truncate_output(output, check.output_max_size),
                      modify_index=index)
        if _same(check, new):
            return Mutation(ttl_resets=(check_id,))
        return Mutation(index=index, ops=(Op("check", check_id, new),), ttl_resets=(check_id,))

    # --- timers ----------------------------------------------------------------------------------

    def next_ttl_deadline(self) -> float | None:
        return min(self._ttl_deadline.values(), default=None)

    def plan_ttl_expiry(self, now: float) -> Mutation:
        """Every TTL check whose deadline passed turns critical with Output ``TTL expired``."""
        index = self.index + 1
        ops = []
        expired = sorted(c for c, deadline in self._ttl_deadline.items() if deadline <= now)
        for check_id in expired:
            check = self.checks.get(check_id)
            if check is None:
                continue
            output = "TTL expired"
            if check.output:
                output += f" (last output before timeout follows): {check.output}"
            new = replace(check, status=CRITICAL, output=output, modify_index=index)
            if not _same(check, new):
                ops.append(Op("check", check_id, new))
        return Mutation(index=index if ops else 0, ops=tuple(ops), ttl_clears=tuple(expired))

    def plan_reap(self, now: float) -> Mutation:
        """Deregister services with a check critical for longer than its
        DeregisterCriticalServiceAfter (raised to ``reap_minimum``)."""
        doomed = set()
        for check_id, since in self._critical_since.items():
            check = self.checks.get(check_id)
            if check is None or not check.service_id or check.deregister_critical_after <= 0:
                continue
            if now - since >= max(self.reap_minimum, check.deregister_critical_after):
                doomed.add(check.service_id)
        return self._plan_remove_services(sorted(doomed), self.index + 1)

    def restart_timers(self, now: float) -> None:
        """After loading from disk: TTL timers and critical clocks start again at ``now``."""
        self._ttl_deadline = {
            c.id: now + c.ttl for c in self.checks.values()
            if c.type == "ttl" and c.status != CRITICAL
        }
        self._critical_since = {c.id: now for c in self.checks.values() if c.status == CRITICAL}

    # --- KV writes (the KV table plans, this assigns the index) ----------------------------------

    def plan_kv_put(self, key: str, value: bytes, *, flags: int, cas: int | None) -> Mutation:
        return self.kv.plan_put(key, value, flags=flags, cas=cas, index=self.index + 1)

    def plan_kv_delete(self, key: str, *, recurse: bool, cas: int | None) -> Mutation:
        return self.kv.plan_delete(key, recurse=recurse, cas=cas, index=self.index + 1)

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
                assert isinstance(op.value, Node)
                self.node = op.value
                touched.update(self._by_name)
                self._bump(wake, index, "nodes")
            elif op.table == "service":
                self._apply_service(op, index, wake, touched)
            else:
                self._apply_check(op, index, wake, touched, now)
        for name in touched:
            dests = {d for d in map(_proxy_destination, self.instances(name)) if d}
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
        if now is not None:
            for check_id in mutation.ttl_clears:
                self._ttl_deadline.pop(check_id, None)
            for check_id in mutation.ttl_resets:
                check = self.checks.get(check_id)
                if check is not None and check.type == "ttl":
                    self._ttl_deadline[check_id] = now + check.ttl
        return wake

    def _bump(self, wake: Wake, index: int, table: str) -> None:
        self.table_index[table] = index
        wake.topics.add(table)

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
            owner = self.services.get(check.service_id)
            if owner is not None:
                touched.add(owner.name)
            elif not check.service_id:
                touched.update(self._by_name)  # node checks are part of every health entry
        if old is not None:
            self._node_checks.discard(op.key)
            if old.service_id:
                self._service_checks.get(old.service_id, set()).discard(op.key)
        new = op.value
        if new is None:
            self._ttl_deadline.pop(op.key, None)
            self._critical_since.pop(op.key, None)
        else:
            assert isinstance(new, Check)
            self.checks[op.key] = new
            if new.service_id:
                self._service_checks.setdefault(new.service_id, set()).add(op.key)
            else:
                self._node_checks.add(op.key)
            if now is not None:
                if new.status != CRITICAL:
                    self._critical_since.pop(op.key, None)
                elif old is None or old.status != CRITICAL:
                    self._critical_since[op.key] = now
        self._bump(wake, index, "checks")

    # --- snapshots -------------------------------------------------------------------------------

    def records(self) -> list[Op]:
        """Every stored record as a put op (node first, services before their checks)."""
        ops: list[Op] = []
        if self.node is not None:
            ops.append(Op("node", self.node.name, self.node))
        ops.extend(Op("service", k, v) for k, v in sorted(self.services.items()))
        ops.extend(Op("check", k, v) for k, v in sorted(self.checks.items()))
        ops.extend(Op("kv", k, v) for k, v in sorted(self.kv.entries.items()))
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
        self.table_index = {k: int(v) for k, v in indexes["tables"].items()}
        self.svc_index = {k: int(v) for k, v in indexes["services"].items()}
        self.names_removed_index = int(indexes["names_removed"])
        self.connect_index = {k: int(v) for k, v in indexes.get("connect", {}).items()}
        self.kv.table_index = int(indexes["kv"])
        self.kv.tombstones = {k: int(v) for k, v in indexes["tombstones"].items()}

