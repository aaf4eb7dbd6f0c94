"""Agent writes: services and checks of the registry's own node, TTL updates, interval-check
results, maintenance mode, TTL expiry and the critical-service reaper (docs/consul-api.md §4, §5).

Pure: every method plans a ``Mutation`` against the current state (``StateCore``) or raises
``ApiError`` with Consul's text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from meshd.registry.embedded.store.agent import (
    check_from_definition,
    service_from_definition,
    truncate_output,
)
from meshd.registry.embedded.store.core import StateCore, same
from meshd.registry.embedded.store.records import (
    CHECK_STATUSES,
    CRITICAL,
    ApiError,
    Check,
    Mutation,
    Op,
)

SERVICE_MAINT_PREFIX = "_service_maintenance:"
NODE_MAINT = "_node_maintenance"
INTERVAL_TYPES = ("http", "tcp")  # the interval checks the registry runs itself


def unknown_service(service_id: str) -> ApiError:
    return ApiError(404, f'Unknown service ID "{service_id}". Ensure that the service ID is '
                         "passed, not the service name.")


def unknown_check(check_id: str) -> ApiError:
    return ApiError(404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, '
                         "not the check name.")


class AgentWrites(StateCore):
    def agent_service(self, service_id: str) -> ApiError | None:
        """None when ``service_id`` is an agent service, else the 404 to answer."""
        found = self.services.get(service_id)
        return None if found is not None and found.agent else unknown_service(service_id)

    def agent_check(self, check_id: str) -> Check:
        check = self.checks.get(check_id)
        if check is None or not check.agent:
            raise unknown_check(check_id)
        return check

    # --- services --------------------------------------------------------------------------------

    def plan_register_service(
        self, definition: Mapping[str, Any], *, replace_existing_checks: bool = False
    ) -> Mutation:
        service, checks = service_from_definition(definition)
        index = self.index + 1
        old = self.services.get(service.id)
        if old is not None and not old.agent and old.id == "consul":
            raise ApiError(400, f'Invalid service: ID "{service.id}" is reserved')
        ops: list[Op] = []
        new = replace(service, create_index=old.create_index if old else index,
                      modify_index=index)
        if old is None or not same(old, new):
            ops.append(Op("service", service.id, new))
        resets = []
        declared = set()
        for check in checks:
            declared.add(check.id)
            check = self._keep_state(check, index)
            if check.id not in self.checks or not same(self.checks[check.id], check):
                ops.append(Op("check", check.id, check))
            if check.type == "ttl":
                resets.append(check.id)
        if replace_existing_checks:
            stale = sorted(self._service_checks.get(service.id, set()) - declared)
            ops.extend(Op("check", c, None) for c in stale)
        return self.mutation(index, ops, ttl_resets=tuple(resets))

    def _keep_state(self, check: Check, index: int) -> Check:
        """A re-declared check keeps its Status and Output (docs/consul-api.md §4.1)."""
        existing = self.checks.get(check.id)
        if existing is not None and not existing.agent:
            raise ApiError(400, f'Invalid check: ID "{check.id}" is reserved')
        if existing is None:
            return replace(check, create_index=index, modify_index=index)
        return replace(check, status=existing.status, output=existing.output,
                       create_index=existing.create_index, modify_index=index)

    def plan_deregister_service(self, service_id: str) -> Mutation:
        missing = self.agent_service(service_id)
        if missing is not None:
            raise missing
        return self.plan_remove_services([service_id], self.index + 1)

    def plan_remove_services(self, service_keys: Iterable[str], index: int) -> Mutation:
        return self.mutation(index, self.remove_services_ops(service_keys))

    def remove_services_ops(self, service_keys: Iterable[str]) -> list[Op]:
        ops: list[Op] = []
        for key in service_keys:
            checks = sorted(self._service_checks.get(key, ()))
            ops.extend(Op("check", c, None) for c in checks)
            ops.append(Op("service", key, None))
        return ops

    # --- checks ----------------------------------------------------------------------------------

    def plan_register_check(self, definition: Mapping[str, Any]) -> Mutation:
        name = definition.get("Name", "")
        if not name:
            raise ApiError(400, "Missing check name")
        check_id = definition.get("CheckID") or definition.get("ID") or name
        service_id = definition.get("ServiceID", "")
        if service_id and self.agent_service(service_id) is not None:
            raise ApiError(404, f'ServiceID "{service_id}" does not exist')
        status = definition.get("Status", "")
        if status and status not in CHECK_STATUSES:
            raise ApiError(400, "Bad check status")
        check = check_from_definition(definition, check_id=check_id, service_id=service_id,
                                      default_name=name)
        index = self.index + 1
        check = self._keep_state(check, index)
        existing = self.checks.get(check_id)
        ops = [] if existing is not None and same(existing, check) else [
            Op("check", check_id, check)]
        resets = (check_id,) if check.type == "ttl" else ()
        return self.mutation(index, ops, ttl_resets=resets)

    def plan_deregister_check(self, check_id: str) -> Mutation:
        self.agent_check(check_id)
        return self.mutation(self.index + 1, [Op("check", check_id, None)])

    def plan_check_update(self, check_id: str, status: str, output: str) -> Mutation:
        """A TTL check's pass/warn/fail/update: new status and Output, timer restarted."""
        check = self.agent_check(check_id)
        if check.type != "ttl":
            raise ApiError(500, f'CheckID "{check_id}" does not have associated TTL')
        index = self.index + 1
        new = replace(check, status=status, output=truncate_output(output, check.output_max_size),
                      modify_index=index)
        if same(check, new):
            return Mutation(ttl_resets=(check_id,))
        return self.mutation(index, [Op("check", check_id, new)], ttl_resets=(check_id,))

    def plan_check_result(
        self, check_id: str, status: str, output: str, definition: Mapping[str, Any]
    ) -> Mutation:
        """The outcome of one run of an HTTP/TCP check (after its success/failure thresholds).
        Ignored when the check went away or was re-defined while it ran."""
        check = self.checks.get(check_id)
        if check is None or check.type not in INTERVAL_TYPES or check.definition != definition:
            return Mutation()
        index = self.index + 1
        new = replace(check, status=status, output=truncate_output(output, check.output_max_size),
                      modify_index=index)
        if same(check, new):
            return Mutation()
        return self.mutation(index, [Op("check", check_id, new)])

    # --- maintenance -----------------------------------------------------------------------------

    def plan_service_maintenance(self, service_id: str, enable: bool, reason: str) -> Mutation:
        missing = self.agent_service(service_id)
        if missing is not None:
            raise missing
        return self._maintenance(SERVICE_MAINT_PREFIX + service_id, enable, Check(
            id=SERVICE_MAINT_PREFIX + service_id, name="Service Maintenance Mode",
            status=CRITICAL, service_id=service_id,
            notes=reason or "Maintenance mode is enabled for this service, but no reason was "
                            "provided. This is a default message.",
        ))

    def plan_node_maintenance(self, enable: bool, reason: str) -> Mutation:
        return self._maintenance(NODE_MAINT, enable, Check(
            id=NODE_MAINT, name="Node Maintenance Mode", status=CRITICAL,
            notes=reason or "Maintenance mode is enabled for this node, but no reason was "
                            "provided. This is a default message.",
        ))

    def _maintenance(self, check_id: str, enable: bool, check: Check) -> Mutation:
        index = self.index + 1
        present = check_id in self.checks
        if enable == present:
            return Mutation()  # already in (or out of) maintenance: Consul keeps the old reason
        if enable:
            new = replace(check, create_index=index, modify_index=index)
            return self.mutation(index, [Op("check", check_id, new)])
        return self.mutation(index, [Op("check", check_id, None)])

    # --- timers ----------------------------------------------------------------------------------

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
            if not same(check, new):
                ops.append(Op("check", check_id, new))
        return self.mutation(index, ops, ttl_clears=tuple(expired))

    def plan_reap(self, now: float) -> Mutation:
        """Deregister agent services with a check critical for longer than its
        DeregisterCriticalServiceAfter (raised to ``reap_minimum``)."""
        doomed = set()
        for check_id, since in self._critical_since.items():
            check = self.checks.get(check_id)
            if (check is None or not check.agent or not check.service_id
                    or check.deregister_critical_after <= 0):
                continue
            if now - since >= max(self.reap_minimum, check.deregister_critical_after):
                doomed.add(check.service_key)
        return self.plan_remove_services(sorted(doomed), self.index + 1)
