"""KV, session and transaction endpoints (docs/consul-api.md §8, §9). Request in, ``Read`` or
``Write`` out, no I/O."""

from __future__ import annotations

import uuid
from typing import Any

from meshd.httpd import Request, Response
from meshd.registry.embedded.acl import Authorizer
from meshd.registry.embedded.api import KV_MAX_VALUE, ApiBase, route
from meshd.registry.embedded.http import Read, Route, Write, json_response, parse_uint, raw_query
from meshd.registry.embedded.state import RegistryState
from meshd.registry.embedded.store.decode import decode_body
from meshd.registry.embedded.store.records import ApiError, Mutation, Session
from meshd.registry.embedded.store.render import kv_entry_json
from meshd.registry.embedded.store.sessions import SESSION_SCHEMA, session_json
from meshd.registry.embedded.store.txn import READ_VERBS, KVOp, TxnResult, decode_txn, plan_txn


def txn_op_allowed(authz: Authorizer, op: KVOp) -> bool:
    """Consul's per-operation vetting of a KV transaction op."""
    if op.verb == "delete-tree":
        return authz.can_write_prefix(op.key)
    if op.verb in READ_VERBS:
        return op.verb == "get-tree" or authz.can("key", "read", op.key)
    return authz.can("key", "write", op.key)


def _too_large(size: int) -> ApiError:
    return ApiError(413, f"Request body({size} bytes) too large, max size: {KV_MAX_VALUE} "
                         "bytes. See https://developer.hashicorp.com/consul/docs/agent/config/"
                         "config-files#kv_max_value_size.")


class KVApi(ApiBase):
    def routes(self) -> list[Route]:
        return [
            route("/v1/kv/*", GET=self.kv_get, PUT=self.kv_put, DELETE=self.kv_delete),
            route("/v1/txn", PUT=self.txn),
            route("/v1/session/create", PUT=self.session_create),
            route("/v1/session/destroy/*", PUT=self.session_destroy),
            route("/v1/session/renew/*", PUT=self.session_renew),
            route("/v1/session/info/*", GET=self.session_info),
            route("/v1/session/node/*", GET=self.session_node),
            route("/v1/session/list", GET=self.session_list),
        ]

    # --- KV --------------------------------------------------------------------------------------

    def kv_get(self, request: Request, tail: str) -> Read:
        self._common(request)
        kv = self.state.kv
        key = tail
        listing = request.has_param("keys")
        recurse = request.has_param("recurse")
        if not key and not listing and not recurse:
            raise ApiError(400, "Missing key name")
        authz = self.authz(request)
        extra: list[tuple[str, str]] = []
        if listing:
            sep = request.param("separator") or request.param("seperator") or ""
            keys = self.acl_filter(authz, kv.list_keys(key, sep),
                                   lambda k: authz.can("key", "read", k), extra)
            missing = not keys and key != ""
            response = Response(404, b"", []) if missing else json_response(request, keys)
            response.headers.extend(extra)
            return Read(response, index=kv.index_for_prefix(key), kv_prefix=key)
        if recurse:
            entries = self.acl_filter(authz, kv.list_prefix(key),
                                      lambda e: authz.can("key", "read", e.key), extra)
            response = (json_response(request, [kv_entry_json(e) for e in entries]) if entries
                        else Response(404, b"", []))
            response.headers.extend(extra)
            return Read(response, index=kv.index_for_prefix(key), kv_prefix=key)
        authz.require("key", "read", key)
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
            raise _too_large(size)
        self.authz(request).require("key", "write", key)
        value = request.body
        acquire, release = request.param("acquire"), request.param("release")

        def plan(state: RegistryState, now: float) -> Mutation:
            if acquire is not None:
                return state.plan_kv_acquire(key, value, flags=flags, session=acquire, now=now)
            if release is not None:
                return state.plan_kv_release(key, value, flags=flags, session=release)
            return state.plan_kv_put(key, value, flags=flags, cas=cas)

        return Write(plan, lambda m: json_response(request, bool(m.result)))

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
        authz = self.authz(request)
        if recurse:
            authz.require_write_prefix(key)
        else:
            authz.require("key", "write", key)
        return Write(lambda s, now: s.plan_kv_delete(key, recurse=recurse, cas=cas),
                     lambda m: json_response(request, bool(m.result)))

    # --- transactions ----------------------------------------------------------------------------

    def txn(self, request: Request, tail: str) -> Write:
        self._common(request)
        ops = decode_txn(request.body, KV_MAX_VALUE)
        authz = self.authz(request)
        denied = [i for i, op in enumerate(ops) if not txn_op_allowed(authz, op)]
        if denied:
            refused = TxnResult(409, {"Results": None, "Errors": [
                {"OpIndex": i, "What": "Permission denied"} for i in denied]}, False)
            return Write(lambda s, now: Mutation(result=refused), self._txn_answer(request, authz))
        return Write(lambda s, now: plan_txn(s, ops, now), self._txn_answer(request, authz))

    @staticmethod
    def _txn_answer(request: Request, authz: Authorizer) -> Any:
        def respond(mutation: Mutation) -> Response:
            result: TxnResult = mutation.result
            body = result.body
            if body.get("Results"):
                # get-tree answers only what the token may read (Consul filters txn results)
                body = {**body, "Results": [r for r in body["Results"]
                                            if authz.can("key", "read", r["KV"]["Key"])]}
            response = json_response(request, body, result.status)
            if result.read_only:
                response.headers += [("X-Consul-KnownLeader", "true"),
                                     ("X-Consul-LastContact", "0")]
            return response

        return respond

    # --- sessions --------------------------------------------------------------------------------

    def session_create(self, request: Request, tail: str) -> Write:
        self._common(request)
        definition = decode_body(SESSION_SCHEMA, request.body) if request.body.strip() else {}
        node = definition.get("Node") or self.node.name
        self.authz(request).require("session", "write", node)
        session_id = str(uuid.uuid4())
        ttl_min = self.settings.session_ttl_min
        return Write(lambda s, now: s.plan_session_create(definition, session_id,
                                                          ttl_min=ttl_min),
                     lambda m: json_response(request, m.result))

    def _require_session_write(self, request: Request, session_id: str) -> None:
        session = self.state.sessions.get(session_id)
        node = self.state.node_name(session.node) if session is not None else None
        self.authz(request).require("session", "write", node)

    def session_destroy(self, request: Request, tail: str) -> Write:
        session_id = self._arg(tail, "session id")
        self._require_session_write(request, session_id)
        return Write(lambda s, now: s.plan_session_destroy(session_id),
                     lambda m: json_response(request, True))

    def session_renew(self, request: Request, tail: str) -> Write:
        session_id = self._arg(tail, "session id")
        self._require_session_write(request, session_id)
        return Write(lambda s, now: s.plan_session_renew(session_id),
                     lambda m: json_response(request, [session_json(self.state, m.result)]))

    def _sessions_read(self, request: Request, sessions: list[Session]) -> Read:
        self._common(request)
        authz = self.authz(request)
        extra: list[tuple[str, str]] = []
        visible = self.acl_filter(authz, sessions, lambda s: authz.can(
            "session", "read", self.state.node_name(s.node)), extra)
        response = json_response(request, [session_json(self.state, s) for s in visible])
        response.headers.extend(extra)
        return Read(response, index=self.state.table("sessions"), topics=("sessions",))

    def session_info(self, request: Request, tail: str) -> Read:
        session_id = self._arg(tail, "session id")
        found = self.state.sessions.get(session_id)
        return self._sessions_read(request, [found] if found is not None else [])

    def session_node(self, request: Request, tail: str) -> Read:
        name = self._arg(tail, "node name")
        node = self.state.node_key(name)
        sessions = [s for s in self.state.sorted_sessions() if s.node == node]
        return self._sessions_read(request, sessions if node is not None else [])

    def session_list(self, request: Request, tail: str) -> Read:
        return self._sessions_read(request, self.state.sorted_sessions())
