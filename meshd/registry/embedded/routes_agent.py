"""Agent endpoints (docs/consul-api.md §4, §5, §10):
services, checks, TTL updates, maintenance mode,
agent-local health, self and members. Request in, ``Read`` or ``Write`` out, no I/O."""

from __future__ import annotations

from typing import Any

from meshd.httpd import Request, Response
from meshd.registry.embedded.acl import Authorizer
from meshd.registry.embedded.api import ApiBase, empty_response, route
from meshd.registry.embedded.filter_schemas import AGENT_SERVICE, HEALTH_CHECK
from meshd.registry.embedded.http import Read, Route, Write, json_response, parse_bool_param
from meshd.registry.embedded.store.agent_writes import NODE_MAINT, SERVICE_MAINT_PREFIX
from meshd.registry.embedded.store.decode import (
    CHECK_SCHEMA,
    CHECK_UPDATE_SCHEMA,
    SERVICE_SCHEMA,
    decode_body,
)
from meshd.registry.embedded.store.records import (
    CHECK_STATUSES,
    CRITICAL,
    PASSING,
    WARNING,
    ApiError,
    Check,
    Service,
)
from meshd.registry.embedded.store.render import (
    agent_self_json,
    agent_service_json,
    check_json,
    content_hash,
    member_json,
)

MAINTENANCE = "maintenance"


def aggregated_status(checks: list[Check]) -> str:
    """api.HealthChecks.AggregatedStatus: maintenance, then critical, warning, passing."""
    if any(c.id == NODE_MAINT or c.id.startswith(SERVICE_MAINT_PREFIX) for c in checks):
        return MAINTENANCE
    statuses = {c.status for c in checks}
    for status in (CRITICAL, WARNING):
        if status in statuses:
            return status
    return PASSING


def _status_code(status: str) -> int:
    return {PASSING: 200, WARNING: 429}.get(status, 503)


class AgentApi(ApiBase):
    def routes(self) -> list[Route]:
        return [
            route("/v1/agent/self", GET=self.agent_self),
            route("/v1/agent/members", GET=self.agent_members),
            route("/v1/agent/services", GET=self.agent_services),
            route("/v1/agent/service/*", GET=self.agent_service),
            route("/v1/agent/service/register", PUT=self.service_register),
            route("/v1/agent/service/deregister/*", PUT=self.service_deregister),
            route("/v1/agent/service/maintenance/*", PUT=self.service_maintenance),
            route("/v1/agent/maintenance", PUT=self.node_maintenance),
            route("/v1/agent/checks", GET=self.agent_checks),
            route("/v1/agent/check/register", PUT=self.check_register),
            route("/v1/agent/check/deregister/*", PUT=self.check_deregister),
            route("/v1/agent/check/pass/*", PUT=self.check_pass),
            route("/v1/agent/check/warn/*", PUT=self.check_warn),
            route("/v1/agent/check/fail/*", PUT=self.check_fail),
            route("/v1/agent/check/update/*", PUT=self.check_update),
            route("/v1/agent/health/service/id/*", GET=self.health_by_id),
            route("/v1/agent/health/service/name/*", GET=self.health_by_name),
        ]

    # --- permissions -----------------------------------------------------------------------------

    def _agent_services(self) -> list[Service]:
        return sorted((s for s in self.state.services.values() if s.agent), key=lambda s: s.id)

    def _require_check_write(self, request: Request, check: Check) -> None:
        owner = self.state.owner(check)
        if owner is not None:
            self.authz(request).require("service", "write", owner.name)
        else:
            self.authz(request).require("node", "write", self.node.name)

    # --- self, members ---------------------------------------------------------------------------

    def agent_self(self, request: Request, tail: str) -> Read:
        self.authz(request).require("agent", "read", self.node.name)
        return Read(json_response(request, agent_self_json(self.state, acls=self.acl.enabled)))

    def agent_members(self, request: Request, tail: str) -> Read:
        authz = self.authz(request)
        extra: list[tuple[str, str]] = []
        nodes = self.acl_filter(authz, [self.node], lambda n: authz.can("node", "read", n.name),
                                extra)
        response = json_response(request, [member_json(n, acls=self.acl.enabled)
                                           for n in nodes])
        response.headers.extend(extra)
        return Read(response)

    # --- services --------------------------------------------------------------------------------

    def agent_services(self, request: Request, tail: str) -> Read:
        self._common(request)
        authz = self.authz(request)
        predicate = self.predicate(request, AGENT_SERVICE)
        rendered = [agent_service_json(s, self.datacenter) for s in self._agent_services()]
        extra: list[tuple[str, str]] = []
        # Consul filters by ACL after ?filter=, so the header only reports what the filter kept
        visible = self.acl_filter(authz, self.filtered(rendered, predicate),
                                  lambda s: authz.can("service", "read", s["Service"]), extra)
        response = json_response(request, {s["ID"]: s for s in visible})
        response.headers.extend(extra)
        return Read(response)

    def agent_service(self, request: Request, tail: str) -> Read:
        service = self.state.services.get(tail)
        if service is None or not service.agent:
            # blocking on a hash still makes sense: wait for the service to appear
            return Read(Response.text(f"unknown service ID: {tail}", 404),
                        topics=(f"agent-service:{tail}",), content_hash="")
        self.authz(request).require("service", "read", service.name)
        body = agent_service_json(service, self.datacenter)
        digest = content_hash(body)
        body["ContentHash"] = digest
        return Read(json_response(request, body), topics=(f"agent-service:{tail}",),
                    content_hash=digest)

    def service_register(self, request: Request, tail: str) -> Write:
        definition = decode_body(SERVICE_SCHEMA, request.body)
        authz = self.authz(request)
        name = definition.get("Name") or None
        authz.require("service", "write", name)
        # a registration that replaces another service's instance needs write on that one too
        existing = self.state.services.get(definition.get("ID") or name or "")
        if existing is not None and existing.agent:
            authz.require("service", "write", existing.name)
        destination = (definition.get("Proxy") or {}).get("DestinationServiceName")
        if destination:
            authz.require("service", "write", destination)
        for check in self._inline_checks(definition):
            if check.get("ServiceID") not in (None, "", definition.get("ID") or name):
                owner = self.state.services.get(check["ServiceID"])
                authz.require("service", "write", owner.name if owner else None)
        replace_checks = request.has_param("replace-existing-checks") and parse_bool_param(
            request.param("replace-existing-checks") or "") is not False
        return Write(lambda s, now: s.plan_register_service(
            definition, replace_existing_checks=replace_checks), empty_response)

    @staticmethod
    def _inline_checks(definition: dict[str, Any]) -> list[dict[str, Any]]:
        checks = list(definition.get("Checks") or [])
        if definition.get("Check"):
            checks.append(definition["Check"])
        return [c for c in checks if isinstance(c, dict)]

    def _require_service_write(self, request: Request, service_id: str) -> None:
        service = self.state.services.get(service_id)
        if service is not None and service.agent:
            self.authz(request).require("service", "write", service.name)

    def service_deregister(self, request: Request, tail: str) -> Write:
        service_id = self._arg(tail, "service ID")
        self._require_service_write(request, service_id)
        return Write(lambda s, now: s.plan_deregister_service(service_id), empty_response)

    def service_maintenance(self, request: Request, tail: str) -> Write:
        service_id = self._arg(tail, "service ID")
        enable = self.enable_param(request)
        reason = request.param("reason") or ""
        self._require_service_write(request, service_id)
        return Write(lambda s, now: s.plan_service_maintenance(service_id, enable, reason),
                     empty_response)

    def node_maintenance(self, request: Request, tail: str) -> Write:
        enable = self.enable_param(request)
        reason = request.param("reason") or ""
        self.authz(request).require("node", "write", self.node.name)
        return Write(lambda s, now: s.plan_node_maintenance(enable, reason), empty_response)

    # --- checks ----------------------------------------------------------------------------------

    def agent_checks(self, request: Request, tail: str) -> Read:
        self._common(request)
        authz = self.authz(request)
        predicate = self.predicate(request, HEALTH_CHECK)
        checks = sorted((c for c in self.state.checks.values() if c.agent), key=lambda c: c.id)
        rendered = [check_json(self.state, c, agent_view=True) for c in checks]
        extra: list[tuple[str, str]] = []
        visible = self.acl_filter(authz, self.filtered(rendered, predicate),
                                  lambda c: self._check_readable(authz, c), extra)
        response = json_response(request, {c["CheckID"]: c for c in visible})
        response.headers.extend(extra)
        return Read(response)

    def _check_readable(self, authz: Authorizer, check: dict[str, Any]) -> bool:
        if check.get("ServiceName"):
            return authz.can("service", "read", check["ServiceName"])
        return authz.can("node", "read", self.node.name)

    def check_register(self, request: Request, tail: str) -> Write:
        definition = decode_body(CHECK_SCHEMA, request.body)
        authz = self.authz(request)
        owner = self.state.services.get(definition.get("ServiceID", ""))
        if owner is not None and owner.agent:
            authz.require("service", "write", owner.name)
        elif not definition.get("ServiceID"):
            authz.require("node", "write", self.node.name)
        # replacing a check of the same ID needs write on what that check belongs to
        existing = self.state.checks.get(definition.get("CheckID") or definition.get("ID")
                                         or definition.get("Name") or "")
        if existing is not None and existing.agent:
            self._require_check_write(request, existing)
        return Write(lambda s, now: s.plan_register_check(definition), empty_response)

    def _existing_check(self, request: Request, tail: str) -> str:
        check_id = self._arg(tail, "check ID")
        check = self.state.checks.get(check_id)
        if check is not None and check.agent:
            self._require_check_write(request, check)
        return check_id

    def check_deregister(self, request: Request, tail: str) -> Write:
        check_id = self._existing_check(request, tail)
        return Write(lambda s, now: s.plan_deregister_check(check_id), empty_response)

    def _ttl(self, request: Request, tail: str, status: str) -> Write:
        check_id = self._existing_check(request, tail)
        note = request.param("note") or ""
        return Write(lambda s, now: s.plan_check_update(check_id, status, note), empty_response)

    def check_pass(self, request: Request, tail: str) -> Write:
        return self._ttl(request, tail, PASSING)

    def check_warn(self, request: Request, tail: str) -> Write:
        return self._ttl(request, tail, WARNING)

    def check_fail(self, request: Request, tail: str) -> Write:
        return self._ttl(request, tail, CRITICAL)

    def check_update(self, request: Request, tail: str) -> Write:
        check_id = self._existing_check(request, tail)
        update = decode_body(CHECK_UPDATE_SCHEMA, request.body)
        status = update.get("Status", "")
        if status not in CHECK_STATUSES:
            raise ApiError(400, f"Invalid check status: '{status}'")
        output = update.get("Output", "")
        return Write(lambda s, now: s.plan_check_update(check_id, status, output),
                     empty_response)

    # --- agent-local health (docs/consul-api.md §5.7) ---------------------------------------------

    def _service_health(self, service: Service) -> tuple[str, dict[str, Any]]:
        checks = self.state.node_checks("") + self.state.checks_of(service.key)
        checks = [c for c in checks if c.agent]
        status = aggregated_status(checks)
        return status, {
            "AggregatedStatus": status,
            "Service": agent_service_json(service, self.datacenter),
            "Checks": [check_json(self.state, c) for c in checks],
        }

    @staticmethod
    def _text(request: Request) -> bool:
        return request.param("format") == "text" or (
            request.header("accept") or "").startswith("text/plain")

    def health_by_id(self, request: Request, tail: str) -> Read:
        service_id = self._arg(tail, "service ID")
        service = self.state.services.get(service_id)
        if service is None or not service.agent:
            reason = f"ServiceId {service_id} not found"
            if self._text(request):
                return Read(Response.text(reason, 404))
            return Read(json_response(request, {"AggregatedStatus": CRITICAL, "Service": None,
                                                "Checks": None}, 404))
        self.authz(request).require("service", "read", service.name)
        status, body = self._service_health(service)
        return self._health_answer(request, status, body)

    def health_by_name(self, request: Request, tail: str) -> Read:
        name = self._arg(tail, "service name")
        services = [s for s in self._agent_services() if s.name == name]
        if not services:
            reason = f"ServiceName {name} Not Found"
            if self._text(request):
                return Read(Response.text(reason, 404))
            return Read(json_response(request, [], 404))
        self.authz(request).require("service", "read", name)
        results = [self._service_health(s) for s in services]
        order = [PASSING, WARNING, CRITICAL, MAINTENANCE]
        status = max((r[0] for r in results), key=order.index)
        return self._health_answer(request, status, [r[1] for r in results])

    def _health_answer(self, request: Request, status: str, body: Any) -> Read:
        code = _status_code(status)
        if self._text(request):
            return Read(Response.text(status, code, [("X-Consul-Reason", status)]))
        response = json_response(request, body, code)
        response.headers.append(("X-Consul-Reason", status))
        return Read(response)
