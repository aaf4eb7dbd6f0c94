"""Catalog and health endpoints (docs/consul-api.md §6, §7): blocking reads over every node, and the
low-level catalog writes. Request in, ``Read`` or ``Write`` out, no I/O.

With ACLs on, the anonymous token reads nothing: these lists come back empty (``catalog/node``
comes back null), as Consul's filtering does, never as a 403."""

from __future__ import annotations

from typing import Any

from meshd.httpd import Request
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

    def _visible(self, request: Request) -> bool:
        """Whether the token may read catalog data (the master-token model is all or nothing)."""
        return self.authz(request).allowed()

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
        body: dict[str, list[str]] = {}
        if self._visible(request):
            for name in self.state.service_names():
                rendered = [self._catalog_json(s)
                            for s in self._tagged(request, self.state.instances(name))]
                rendered = self.filtered(rendered, predicate)
                if rendered:
                    body[name] = sorted({t for s in rendered for t in s["ServiceTags"]})
        return Read(json_response(request, body), index=self.state.table("services"),
                    topics=("services",), consistency=True)

    def _service_list(self, request: Request, services: list[Service]) -> list[Any]:
        predicate = self.predicate(request, CATALOG_SERVICE)
        if not self._visible(request):
            return []
        rendered = [self._catalog_json(s) for s in self._tagged(request, services)]
        return self.filtered(rendered, predicate)

    def catalog_service(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "service name")
        body = self._service_list(request, self.state.instances(name))
        return Read(json_response(request, body), index=self.state.service_index(name),
                    topics=(f"svc:{name}",), consistency=True)

    def catalog_connect(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "service name")
        body = self._service_list(request, self.state.connect_instances(name))
        return Read(json_response(request, body), index=self.state.connect_service_index(name),
                    topics=(f"connect:{name}",), consistency=True)

    def catalog_nodes(self, request: Request, tail: str) -> Read:
        self._common(request)
        predicate = self.predicate(request, NODE)
        nodes = [node_json(n) for n in self.state.sorted_nodes()
                 if self._node_meta_matches(request, n.meta)] if self._visible(request) else []
        return Read(json_response(request, self.filtered(nodes, predicate)),
                    index=self.state.table("nodes"), topics=("nodes",), consistency=True)

    def catalog_node(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "node name")
        predicate = self.predicate(request, NODE_SERVICE)
        node = self.state.node_key(name)
        body: Any = None
        if node is not None and self._visible(request):
            services = [node_service_json(s, health=False)
                        for s in sorted(self.state.node_services(node), key=lambda s: s.id)]
            body = {"Node": node_json(self.state.node_record(node)),
                    "Services": {s["ID"]: s for s in self.filtered(services, predicate)}}
        return Read(json_response(request, body), index=self.state.table("nodes", "services"),
                    topics=("nodes", "services"), consistency=True)

    # --- catalog writes --------------------------------------------------------------------------

    def catalog_register(self, request: Request, tail: str) -> Write:
        self._common(request)
        body = decode_body(REGISTER_SCHEMA, request.body)
        if "NodeMeta" not in body and request.params("node-meta"):
            # py-consul sends the node's metadata as ?node-meta=k:v
            body["NodeMeta"] = dict(item.partition(":")[::2] for item in
                                    request.params("node-meta"))
        authz = self.authz(request)
        if body.get("Node"):
            authz.require("node", "write", body["Node"])
        if "Service" in body:
            authz.require("service", "write", body["Service"].get("Service") or None)
        return Write(lambda s, now: s.plan_catalog_register(body),
                     lambda m: json_response(request, True))

    def catalog_deregister(self, request: Request, tail: str) -> Write:
        self._common(request)
        body = decode_body(DEREGISTER_SCHEMA, request.body)
        self.authz(request).require("node", "write", body.get("Node") or None)
        return Write(lambda s, now: s.plan_catalog_deregister(body),
                     lambda m: json_response(request, True))

    # --- health ----------------------------------------------------------------------------------

    def _entries(self, request: Request, services: list[Service]) -> list[Any]:
        passing = self.passing_param(request)
        predicate = self.predicate(request, HEALTH_ENTRY)
        if not self._visible(request):
            return []
        entries = [health_entry_json(self.state, s) for s in self._tagged(request, services)]
        if passing:
            entries = [e for e in entries if all(c["Status"] == PASSING for c in e["Checks"])]
        return self.filtered(entries, predicate)

    def health_service(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "service name")
        entries = self._entries(request, self.state.instances(name))
        return Read(json_response(request, entries), index=self.state.service_index(name),
                    topics=(f"svc:{name}",), consistency=True)

    def health_connect(self, request: Request, tail: str) -> Read:
        """The proxies fronting a service
        (docs/consul-api.md §7.1: same shape as health/service)."""
        self._common(request)
        name = self._arg(tail, "service name")
        entries = self._entries(request, self.state.connect_instances(name))
        return Read(json_response(request, entries),
                    index=self.state.connect_service_index(name),
                    topics=(f"connect:{name}",), consistency=True)

    def _checks_read(self, request: Request, checks: list[Check]) -> Read:
        predicate = self.predicate(request, HEALTH_CHECK)
        body = [check_json(self.state, c) for c in self.state.sorted_checks(checks)
                if self._node_meta_matches(request, self.state.node_record(c.node).meta)]
        if not self._visible(request):
            body = []
        return Read(json_response(request, self.filtered(body, predicate)),
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
