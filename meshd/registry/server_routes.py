"""The endpoints of the embedded registry: request in, ``Read`` or ``Write`` out (no I/O).

Each endpoint decodes its request, and either computes its answer from the state (a ``Read``,
which the shell may re-run while blocking) or returns a ``Write`` whose plan the shell runs under
the write lock. Error texts follow consul-api.md §13.
"""

from __future__ import annotations

from typing import Any

from meshd.httpd import Request, Response
from meshd.registry.server_http import (
    Read,
    Route,
    Write,
    json_response,
    parse_bool_param,
    parse_uint,
    raw_query,
)
from meshd.registry.state import RegistryState
from meshd.registry.store_decode import (
    CHECK_SCHEMA,
    CHECK_UPDATE_SCHEMA,
    SERVICE_SCHEMA,
    decode_body,
)
from meshd.registry.store_records import (
    CHECK_STATUSES,
    CRITICAL,
    PASSING,
    WARNING,
    ApiError,
    Mutation,
    Node,
)
from meshd.registry.store_render import (
    agent_self_json,
    agent_service_json,
    catalog_service_json,
    check_json,
    content_hash,
    health_entry_json,
    kv_entry_json,
    leader_address,
    member_json,
    node_json,
    node_service_json,
)

KV_MAX_VALUE = 512 * 1024
HEALTH_STATES = ("any", PASSING, WARNING, CRITICAL)


def _empty(_: Mutation) -> Response:
    return Response(200, b"", [])


class Api:
    def __init__(self, state: RegistryState, datacenter: str) -> None:
        self.state = state
        self.datacenter = datacenter

    @property
    def node(self) -> Node:
        assert self.state.node is not None, "the registry is not booted"
        return self.state.node

    def routes(self) -> list[Route]:
        def r(path: str, **methods: Any) -> Route:
            return Route(path.rstrip("*"), path.endswith("*"), methods)

        return [
            r("/v1/agent/self", GET=self.agent_self),
            r("/v1/agent/members", GET=self.agent_members),
            r("/v1/agent/services", GET=self.agent_services),
            r("/v1/agent/service/*", GET=self.agent_service),
            r("/v1/agent/service/register", PUT=self.service_register),
            r("/v1/agent/service/deregister/*", PUT=self.service_deregister),
            r("/v1/agent/checks", GET=self.agent_checks),
            r("/v1/agent/check/register", PUT=self.check_register),
            r("/v1/agent/check/deregister/*", PUT=self.check_deregister),
            r("/v1/agent/check/pass/*", PUT=self.check_pass),
            r("/v1/agent/check/warn/*", PUT=self.check_warn),
            r("/v1/agent/check/fail/*", PUT=self.check_fail),
            r("/v1/agent/check/update/*", PUT=self.check_update),
            r("/v1/catalog/datacenters", GET=self.catalog_datacenters),
            r("/v1/catalog/services", GET=self.catalog_services),
            r("/v1/catalog/service/*", GET=self.catalog_service),
            r("/v1/catalog/nodes", GET=self.catalog_nodes),
            r("/v1/catalog/node/*", GET=self.catalog_node),
            r("/v1/catalog/connect/*", GET=self.catalog_connect),
            r("/v1/health/service/*", GET=self.health_service),
            r("/v1/health/checks/*", GET=self.health_checks),
            r("/v1/health/state/*", GET=self.health_state),
            r("/v1/health/node/*", GET=self.health_node),
            r("/v1/health/connect/*", GET=self.health_connect),
            r("/v1/kv/*", GET=self.kv_get, PUT=self.kv_put, DELETE=self.kv_delete),
            r("/v1/status/leader", GET=self.status_leader),
            r("/v1/status/peers", GET=self.status_peers),
            r("/v1/acl/*", GET=self.acl_disabled, PUT=self.acl_disabled,
              POST=self.acl_disabled, DELETE=self.acl_disabled),
        ]

    # --- shared checks ---------------------------------------------------------------------------

    def _common(self, request: Request) -> None:
        dc = request.param("dc")
        if dc and dc != self.datacenter:
            raise ApiError(500, "No path to datacenter")
        if request.has_param("filter"):
            raise ApiError(400, "?filter is not supported by the embedded registry yet")

    @staticmethod
    def _arg(tail: str, what: str) -> str:
        if not tail:
            raise ApiError(400, f"Missing {what}")
        return tail

    # --- agent ----------------------------------------------------------------------------------

    def agent_self(self, request: Request, tail: str) -> Read:
        return Read(json_response(request, agent_self_json(self.node)))

    def agent_members(self, request: Request, tail: str) -> Read:
        return Read(json_response(request, [member_json(self.node)]))

    def agent_services(self, request: Request, tail: str) -> Read:
        self._common(request)
        body = {s.id: agent_service_json(s, self.datacenter)
                for s in sorted(self.state.services.values(), key=lambda s: s.id) if s.agent}
        return Read(json_response(request, body))

    def agent_service(self, request: Request, tail: str) -> Read:
        service = self.state.services.get(tail)
        if service is None or not service.agent:
            # blocking on a hash still makes sense: wait for the service to appear
            return Read(Response.text(f"unknown service ID: {tail}", 404),
                        topics=(f"agent-service:{tail}",), content_hash="")
        body = agent_service_json(service, self.datacenter)
        digest = content_hash(body)
        body["ContentHash"] = digest
        return Read(json_response(request, body), topics=(f"agent-service:{tail}",),
                    content_hash=digest)

    def agent_checks(self, request: Request, tail: str) -> Read:
        self._common(request)
        body = {c.id: check_json(self.state, c, agent_view=True)
                for c in sorted(self.state.checks.values(), key=lambda c: c.id) if c.agent}
        return Read(json_response(request, body))

    def service_register(self, request: Request, tail: str) -> Write:
        definition = decode_body(SERVICE_SCHEMA, request.body)
        replace_checks = request.has_param("replace-existing-checks") and parse_bool_param(
            request.param("replace-existing-checks") or "") is not False
        return Write(lambda s: s.plan_register_service(
            definition, replace_existing_checks=replace_checks), _empty)

    def service_deregister(self, request: Request, tail: str) -> Write:
        service_id = self._arg(tail, "service ID")
        return Write(lambda s: s.plan_deregister_service(service_id), _empty)

    def check_register(self, request: Request, tail: str) -> Write:
        definition = decode_body(CHECK_SCHEMA, request.body)
        return Write(lambda s: s.plan_register_check(definition), _empty)

    def check_deregister(self, request: Request, tail: str) -> Write:
        check_id = self._arg(tail, "check ID")
        return Write(lambda s: s.plan_deregister_check(check_id), _empty)

    def _ttl(self, request: Request, tail: str, status: str) -> Write:
        check_id = self._arg(tail, "check ID")
        note = request.param("note") or ""
        return Write(lambda s: s.plan_check_update(check_id, status, note), _empty)

    def check_pass(self, request: Request, tail: str) -> Write:
        return self._ttl(request, tail, PASSING)

    def check_warn(self, request: Request, tail: str) -> Write:
        return self._ttl(request, tail, WARNING)

    def check_fail(self, request: Request, tail: str) -> Write:
        return self._ttl(request, tail, CRITICAL)

    def check_update(self, request: Request, tail: str) -> Write:
        check_id = self._arg(tail, "check ID")
        update = decode_body(CHECK_UPDATE_SCHEMA, request.body)
        status = update.get("Status", "")
        if status not in CHECK_STATUSES:
            raise ApiError(400, f"Invalid check status: '{status}'")
        output = update.get("Output", "")
        return Write(lambda s: s.plan_check_update(check_id, status, output), _empty)

    # --- catalog ---------------------------------------------------------------------------------

    def catalog_datacenters(self, request: Request, tail: str) -> Read:
        return Read(json_response(request, [self.datacenter]))

    def _node_meta_matches(self, request: Request) -> bool:
        for item in request.params("node-meta"):
            key, _, value = item.partition(":")
            if self.node.meta.get(key) != value:
                return False
        return True

    def catalog_services(self, request: Request, tail: str) -> Read:
        self._common(request)
        body: dict[str, list[str]] = {}
        if self._node_meta_matches(request):
            for name in self.state.service_names():
                tags = {t for s in self.state.instances(name) for t in s.tags}
                body[name] = sorted(tags)
        return Read(json_response(request, body), index=self.state.table("services"),
                    topics=("services",), consistency=True)

    def _tagged(self, request: Request, name: str) -> list[Any]:
        wanted = [t.lower() for t in request.params("tag")]
        return [s for s in self.state.instances(name)
                if all(w in {t.lower() for t in s.tags} for w in wanted)]

    def catalog_connect(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "service name")
        body = [catalog_service_json(self.node, s) for s in self.state.connect_instances(name)]
        return Read(json_response(request, body), index=self.state.connect_service_index(name),
                    topics=(f"connect:{name}",), consistency=True)

    def catalog_service(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "service name")
        body = [catalog_service_json(self.node, s) for s in self._tagged(request, name)]
        return Read(json_response(request, body), index=self.state.service_index(name),
                    topics=(f"svc:{name}",), consistency=True)

    def catalog_nodes(self, request: Request, tail: str) -> Read:
        self._common(request)
        body = [node_json(self.node)] if self._node_meta_matches(request) else []
        return Read(json_response(request, body), index=self.state.table("nodes"),
                    topics=("nodes",), consistency=True)

    def catalog_node(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "node name")
        body: Any = None
        if name == self.node.name:
            services = sorted(self.state.services.values(), key=lambda s: s.id)
            body = {"Node": node_json(self.node),
                    "Services": {s.id: node_service_json(s, health=False) for s in services}}
        return Read(json_response(request, body), index=self.state.table("nodes", "services"),
                    topics=("nodes", "services"), consistency=True)

    # --- health ----------------------------------------------------------------------------------

    def health_service(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "service name")
        passing = parse_bool_param(request.param("passing", "false") or "")
        if passing is None:
            raise ApiError(400, "Invalid value for ?passing")
        entries = [health_entry_json(self.state, s) for s in self._tagged(request, name)]
        if passing:
            entries = [e for e in entries if all(c["Status"] == PASSING for c in e["Checks"])]
        return Read(json_response(request, entries), index=self.state.service_index(name),
                    topics=(f"svc:{name}",), consistency=True)

    def health_connect(self, request: Request, tail: str) -> Read:
        """The proxies fronting a service (consul-api.md §7.1: same shape as health/service)."""
        self._common(request)
        name = self._arg(tail, "service name")
        passing = parse_bool_param(request.param("passing", "false") or "")
        if passing is None:
            raise ApiError(400, "Invalid value for ?passing")
        wanted = [t.lower() for t in request.params("tag")]
        proxies = [s for s in self.state.connect_instances(name)
                   if all(w in {t.lower() for t in s.tags} for w in wanted)]
        entries = [health_entry_json(self.state, s) for s in proxies]
        if passing:
            entries = [e for e in entries if all(c["Status"] == PASSING for c in e["Checks"])]
        return Read(json_response(request, entries),
                    index=self.state.connect_service_index(name),
                    topics=(f"connect:{name}",), consistency=True)

    def _checks_read(self, request: Request, checks: list[Any]) -> Read:
        body = [check_json(self.state, c) for c in sorted(checks, key=lambda c: c.id)]
        return Read(json_response(request, body), index=self.state.table("checks"),
                    topics=("checks",), consistency=True)

    def health_checks(self, request: Request, tail: str) -> Read:
        self._common(request)
        name = self._arg(tail, "service name")
        checks = [c for s in self.state.instances(name) for c in self.state.checks_of(s.id)]
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
        checks = list(self.state.checks.values()) if name == self.node.name else []
        return self._checks_read(request, checks)

    # --- KV --------------------------------------------------------------------------------------

    def kv_get(self, request: Request, tail: str) -> Read:
        self._common(request)
        kv = self.state.kv
        key = tail
        listing = request.has_param("keys")
        if not key and not listing and not request.has_param("recurse"):
            raise ApiError(400, "Missing key name")
        if listing:
            sep = request.param("separator") or request.param("seperator") or ""
            keys = kv.list_keys(key, sep)
            missing = not keys and key != ""
            response = Response(404, b"", []) if missing else json_response(request, keys)
            return Read(response, index=kv.index_for_prefix(key), kv_prefix=key)
        if request.has_param("recurse"):
            entries = kv.list_prefix(key)
            response = (json_response(request, [kv_entry_json(e) for e in entries]) if entries
                        else Response(404, b"", []))
            return Read(response, index=kv.index_for_prefix(key), kv_prefix=key)
        entry = kv.get(key)
        if entry is None:
            response = Response(404, b"", [])
        elif request.has_param("raw"):
            response = Response(200, entry.value, [
                ("Content-Type", "text/plain"), ("X-Content-Type-Options", "nosniff"),
                ("Content-Security-Policy", "sandbox"),
            ])
        else:
            response = json_response(request, [kv_entry_json(entry)])
        return Read(response, index=kv.index_for_key(key), kv_key=key)

    def kv_put(self, request: Request, tail: str) -> Write:
        key = self._arg(tail, "key name")
        self._common(request)
        given = [f for f in ("cas", "acquire", "release") if request.has_param(f)]
        if len(given) > 1:
            raise ApiError(400, f"Conflicting flags: {raw_query(request)}\n")
        if given and given[0] != "cas":
            session = request.param(given[0]) or ""
            raise ApiError(500, f'invalid session "{session}"')
        flags = 0
        raw_flags = request.param("flags")
        if raw_flags:
            parsed = parse_uint(raw_flags)
            if parsed is None:
                raise ApiError(500, f'strconv.ParseUint: parsing "{raw_flags}": invalid syntax')
            flags = parsed
        cas = self._cas(request)
        size = len(request.body)
        if size > KV_MAX_VALUE:
            raise ApiError(413, f"Request body({size} bytes) too large, max size: "
                                f"{KV_MAX_VALUE} bytes. See https://developer.hashicorp.com/"
                                "consul/docs/agent/config/config-files#kv_max_value_size.")
        value = request.body
        return Write(lambda s: s.plan_kv_put(key, value, flags=flags, cas=cas),
                     lambda m: json_response(request, bool(m.result)))

    @staticmethod
    def _cas(request: Request) -> int | None:
        raw = request.param("cas")
        if raw is None:
            return None
        cas = parse_uint(raw)
        if cas is None:
            raise ApiError(400, "Invalid cas index")
        return cas

    def kv_delete(self, request: Request, tail: str) -> Write:
        self._common(request)
        recurse = request.has_param("recurse")
        if recurse and request.has_param("cas"):
            raise ApiError(400, f"Conflicting flags: {raw_query(request)}\n")
        if not tail and not recurse:
            raise ApiError(400, "Missing key name")
        cas = self._cas(request)
        key = tail
        return Write(lambda s: s.plan_kv_delete(key, recurse=recurse, cas=cas),
                     lambda m: json_response(request, bool(m.result)))

    # --- status, ACL -----------------------------------------------------------------------------

    def status_leader(self, request: Request, tail: str) -> Read:
        return Read(json_response(request, leader_address(self.node)))

    def status_peers(self, request: Request, tail: str) -> Read:
        return Read(json_response(request, [leader_address(self.node)]))

    def acl_disabled(self, request: Request, tail: str) -> Read:
        return Read(Response.text("ACL support disabled", 401))
