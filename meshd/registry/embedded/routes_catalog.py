"""Catalog and health endpoints (docs/consul-api.md §6, §7): blocking reads over every node, and the
low-level catalog writes. Request in, ``Read`` or ``Write`` out, no I/O.

With ACLs on, reads are filtered as Consul filters them, never answered 403: a service instance
needs ``node:read`` on its node and ``service:read`` on its name, a node ``node:read``, a check
``node:read`` and, for a service check, ``service:read`` (``catalog/node`` of an unreadable node
is null)."""

from __future__ import annotations

from typing import Any

from meshd.httpd import Request, Response
from meshd.registry.embedded.acl import Authorizer
from meshd.registry.embedded.api import ApiBase, route
from meshd.registry.embedded.filter_schemas import (
    CATALOG_SERVICE,
    HEALTH_CHECK,
    HEALTH_ENTRY,
    NODE,
    NODE_SERVICE,
)
from meshd.registry.embedded.http import Read, Route, Write, json_response
from meshd.registry.embedded.store.catalog import DEREGISTER_SCHEMA, REGISTER_SCHEMA
from meshd.registry.embedded.store.decode import decode_body
from meshd.registry.embedded.store.records import (
    CRITICAL,
    PASSING,
    WARNING,
    ApiError,
    Check,
    Service,
    record_key,
)
from meshd.registry.embedded.store.render import (
    catalog_service_json,
    check_json,
    health_entry_json,
    node_json,
    node_service_json,
)

HEALTH_STATES = ("any", PASSING, WARNING, CRITICAL)


class CatalogApi(ApiBase):
    def routes(self) -> list[Route]:
        return [
            route("/v1/catalog/datacenters", GET=self.catalog_datacenters),
            route("/v1/catalog/services", GET=self.catalog_services),
            route("/v1/catalog/service/*", GET=self.catalog_service),
            route("/v1/catalog/nodes", GET=self.catalog_nodes),
            route("/v1/catalog/node/*", GET=self.catalog_node),
            route("/v1/catalog/connect/*", GET=self.catalog_connect),
            route("/v1/catalog/register", PUT=self.catalog_register),
            route("/v1/catalog/deregister", PUT=self.catalog_deregister),
            route("/v1/health/service/*", GET=self.health_service),
            route("/v1/health/checks/*", GET=self.health_checks),
            route("/v1/health/state/*", GET=self.health_state),
            route("/v1/health/node/*", GET=self.health_node),
            route("/v1/health/connect/*", GET=self.health_connect),
        ]

    # --- helpers ---------------------------------------------------------------------------------

    def _instance_readable(self, authz: Authorizer, service: Service) -> bool:
        return (authz.can("node", "read", self.state.node_name(service.node))
                and authz.can("service", "read", service.name))

    def _check_readable(self, authz: Authorizer, check: Check) -> bool:
        if not authz.can("node", "read", self.state.node_name(check.node)):
            return False
        owner = self.state.owner(check)
        return owner is None or authz.can("service", "read", owner.name)

    @staticmethod
    def _answer(request: Request, body: Any, extra: list[tuple[str, str]]) -> Response:
        response = json_response(request, body)
        response.headers.extend(extra)
        return response

    def _node_meta_matches(self, request: Request, meta: dict[str, str]) -> bool:
        for item in request.params("node-meta"):
            key, _, value = item.partition(":")
            if meta.get(key) != value:
                return False
        return True

    def _tagged(self, request: Request, services: list[Service]) -> list[Service]:
        wanted = [t.lower() for t in request.params("tag")]
        return [s for s in services if all(w in {t.lower() for t in s.tags} for w in wanted)
                and self._node_meta_matches(request, self.state.node_record(s.node).meta)]

    def _catalog_json(self, service: Service) -> dict[str, Any]:
        return catalog_service_json(self.state.node_record(service.node), service)

    # --- catalog reads ---------------------------------------------------------------------------

    def catalog_datacenters(self, request: Request, tail: str) -> Read:
        return Read(json_response(request, [self.datacenter]))

    def catalog_services(self, request: Request, tail: str) -> Read:
        self._common(request)
        predicate = self.predicate(request, CATALOG_SERVICE)
        authz = self.authz(request)
        extra: list[tuple[str, str]] = []
        body: dict[str, list[str]] = {}
        names = self.acl_filter(authz, self.state.service_names(),
                                lambda n: authz.can("service", "read", n), extra)
        for name in names:
            rendered = [self._catalog_json(s)
                        for s in self._tagged(request, self.state.instances(name))]
            rendered = self.filtered(rendered, predicate)
            if rendered:
                body[name] = sorted({t for s in rendered for t in s["ServiceTags"]})
        return Read(self._answer(request, body, extra), index=self.state.table("services"),
                    topics=("services",), consistency=True)

    def _service_list(self, request: Request, services: list[Service]) -> Response:
        predicate = self.predicate(request, CATALOG_SERVICE)
        authz = self.authz(request)
        extra: list[tuple[str, str]] = []
        readable = self.acl_filter(authz, self._tagged(request, services),
                                   lambda s: self._instance_readable(authz, s), extra)
        rendered = [self._catalog_json(s) for s in readable]
        return self._answer(request, self.filtered(rendered, predicate), extra)

    def catalog_service(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "service name")
        response = self._service_list(request, self.state.instances(name))
        return Read(response, index=self.state.service_index(name),
                    topics=(f"svc:{name}",), consistency=True)

    def catalog_connect(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "service name")
        response = self._service_list(request, self.state.connect_instances(name))
        return Read(response, index=self.state.connect_service_index(name),
                    topics=(f"connect:{name}",), consistency=True)

    def catalog_nodes(self, request: Request, tail: str) -> Read:
        self._common(request)
        predicate = self.predicate(request, NODE)
        authz = self.authz(request)
        extra: list[tuple[str, str]] = []
        readable = self.acl_filter(authz, self.state.sorted_nodes(),
                                   lambda n: authz.can("node", "read", n.name), extra)
        nodes = [node_json(n) for n in readable if self._node_meta_matches(request, n.meta)]
        return Read(self._answer(request, self.filtered(nodes, predicate), extra),
                    index=self.state.table("nodes"), topics=("nodes",), consistency=True)

    def catalog_node(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "node name")
        predicate = self.predicate(request, NODE_SERVICE)
        node = self.state.node_key(name)
        authz = self.authz(request)
        extra: list[tuple[str, str]] = []
        body: Any = None
        if node is not None and authz.can("node", "read", name):
            own = sorted(self.state.node_services(node), key=lambda s: s.id)
            readable = self.acl_filter(authz, own,
                                       lambda s: authz.can("service", "read", s.name), extra)
            services = [node_service_json(s, health=False) for s in readable]
            body = {"Node": node_json(self.state.node_record(node)),
                    "Services": {s["ID"]: s for s in self.filtered(services, predicate)}}
        elif node is not None and authz.token_given:
            extra.append(("X-Consul-Results-Filtered-By-ACLs", "true"))
        return Read(self._answer(request, body, extra),
                    index=self.state.table("nodes", "services"),
                    topics=("nodes", "services"), consistency=True)

    # --- catalog writes --------------------------------------------------------------------------

    def catalog_register(self, request: Request, tail: str) -> Write:
        self._common(request)
        body = decode_body(REGISTER_SCHEMA, request.body)
        if "NodeMeta" not in body and request.params("node-meta"):
            # py-consul sends the node's metadata as ?node-meta=k:v
            body["NodeMeta"] = dict(item.partition(":")[::2] for item in
                                    request.params("node-meta"))
        self._vet_register(self.authz(request), body)
        return Write(lambda s, now: s.plan_catalog_register(body),
                     lambda m: json_response(request, True))

    def catalog_deregister(self, request: Request, tail: str) -> Write:
        self._common(request)
        body = decode_body(DEREGISTER_SCHEMA, request.body)
        self._vet_deregister(self.authz(request), body)
        return Write(lambda s, now: s.plan_catalog_deregister(body),
                     lambda m: json_response(request, True))

    def _node_changes(self, body: dict[str, Any]) -> bool:
        """Whether a registration writes the node itself (Consul then needs node:write; a
        service update re-posting the same node details does not)."""
        known = self.state.nodes.get(body["Node"])
        if known is None:
            return True
        if body.get("SkipNodeUpdate"):
            return False
        return (body.get("Address", "") != known.address
                or ("TaggedAddresses" in body and body["TaggedAddresses"] != known.tagged_addresses)
                or ("NodeMeta" in body and body["NodeMeta"] != known.meta))

    def _vet_register(self, authz: Authorizer, body: dict[str, Any]) -> None:
        """Consul's vetRegisterWithACL (skipped when the token may do everything)."""
        node = body.get("Node") or ""
        if not node or authz.can_do_everything:
            return  # refused by the plan: "Must provide node"
        if self._node_changes(body):
            authz.require("node", "write", node)
        node_key = self.state.node_key(node)
        service = body.get("Service")
        service_id = ""
        if service is not None:
            authz.require("service", "write", service.get("Service") or None)
            service_id = service.get("ID") or service.get("Service") or ""
            destination = (service.get("Proxy") or {}).get("DestinationServiceName")
            if service.get("Kind") == "connect-proxy" and destination:
                authz.require("service", "write", destination)
            if node_key is not None:
                replaced = self.state.services.get(record_key(node_key, service_id))
                if replaced is not None:
                    authz.require("service", "write", replaced.name)
        checks = ([body["Check"]] if body.get("Check") else []) + list(body.get("Checks") or ())
        for check in checks:
            check_service = check.get("ServiceID") or ""
            if not check_service:
                authz.require("node", "write", node)
            elif check_service != service_id:
                other = (self.state.services.get(record_key(node_key, check_service))
                         if node_key is not None else None)
                if other is None:
                    raise ApiError(500, f"Unknown service ID '{check_service}' for check ID "
                                        f"'{check.get('CheckID') or check.get('Name') or ''}'")
                authz.require("service", "write", other.name)

    def _vet_deregister(self, authz: Authorizer, body: dict[str, Any]) -> None:
        """Consul's vetDeregisterWithACL: node:write covers everything on the node; otherwise
        the service (or the check's service) must be writable."""
        node = body.get("Node") or ""
        if not node or authz.can_do_everything or authz.can("node", "write", node):
            return
        node_key = self.state.node_key(node)
        if body.get("ServiceID"):
            found = (self.state.services.get(record_key(node_key, body["ServiceID"]))
                     if node_key is not None else None)
            if found is None:
                raise ApiError(500, f"Unknown service ID '{body['ServiceID']}'")
            authz.require("service", "write", found.name)
        elif body.get("CheckID"):
            check = (self.state.checks.get(record_key(node_key, body["CheckID"]))
                     if node_key is not None else None)
            if check is None:
                raise ApiError(500, f"Unknown check ID '{body['CheckID']}'")
            owner = self.state.owner(check)
            if owner is not None:
                authz.require("service", "write", owner.name)
            else:
                authz.require("node", "write", node)
        else:
            authz.require("node", "write", node)

    # --- health ----------------------------------------------------------------------------------

    def _entries(self, request: Request, services: list[Service]) -> Response:
        passing = self.passing_param(request)
        predicate = self.predicate(request, HEALTH_ENTRY)
        authz = self.authz(request)
        extra: list[tuple[str, str]] = []
        readable = self.acl_filter(authz, self._tagged(request, services),
                                   lambda s: self._instance_readable(authz, s), extra)
        entries = [health_entry_json(self.state, s) for s in readable]
        if passing:
            entries = [e for e in entries if all(c["Status"] == PASSING for c in e["Checks"])]
        return self._answer(request, self.filtered(entries, predicate), extra)

    def health_service(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "service name")
        response = self._entries(request, self.state.instances(name))
        return Read(response, index=self.state.service_index(name),
                    topics=(f"svc:{name}",), consistency=True)

    def health_connect(self, request: Request, tail: str) -> Read:
        """The proxies fronting a service
        (docs/consul-api.md §7.1: same shape as health/service)."""
        self._common(request)
        name = self._arg(tail, "service name")
        response = self._entries(request, self.state.connect_instances(name))
        return Read(response,
                    index=self.state.connect_service_index(name),
                    topics=(f"connect:{name}",), consistency=True)

    def _checks_read(self, request: Request, checks: list[Check]) -> Read:
        predicate = self.predicate(request, HEALTH_CHECK)
        authz = self.authz(request)
        extra: list[tuple[str, str]] = []
        readable = self.acl_filter(authz, self.state.sorted_checks(checks),
                                   lambda c: self._check_readable(authz, c), extra)
        body = [check_json(self.state, c) for c in readable
                if self._node_meta_matches(request, self.state.node_record(c.node).meta)]
        return Read(self._answer(request, self.filtered(body, predicate), extra),
                    index=self.state.table("checks"), topics=("checks",), consistency=True)

    def health_checks(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "service name")
        checks = [c for s in self.state.instances(name) for c in self.state.checks_of(s.key)]
        return self._checks_read(request, checks)

    def health_state(self, request: Request, tail: str) -> Read:
        self._common(request)
        if tail not in HEALTH_STATES:
            raise ApiError(400, "Invalid state")
        checks = [c for c in self.state.checks.values() if tail in ("any", c.status)]
        return self._checks_read(request, checks)

    def health_node(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "node name")
        node = self.state.node_key(name)
        checks = [] if node is None else [c for c in self.state.checks.values()
                                          if c.node == node]
        return self._checks_read(request, checks)
