"""ACL endpoints (docs/consul-api.md §1.5): bootstrap, policies, tokens, token/self, and the agent
token endpoint. Request in, ``Read`` or ``Write`` out, no I/O apart from drawing random IDs and
reading the wall clock for ``CreateTime``.

Shapes, status codes and texts are Consul's (``agent/acl_endpoint.go``): 401 ``ACL support
disabled`` with ACLs off, 403 for a missing ``acl:read``/``acl:write``, 404 ``Requested policy
does not exist: ACL not found`` for a missing object, 500 with Consul's text for what its RPC
layer refuses. Roles, auth methods, binding rules, templated policies and service or node
identities are not implemented: a body naming them is refused with 400 rather than half-applied.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from meshd.httpd import Request, Response
from meshd.registry.embedded.acl import Authorizer, request_token
from meshd.registry.embedded.api import ApiBase, route
from meshd.registry.embedded.http import Read, Route, Write, json_response
from meshd.registry.embedded.state import RegistryState
from meshd.registry.embedded.store.decode import DecodeError, Schema, decode_body
from meshd.registry.embedded.store.records import AclPolicy, AclToken, ApiError, Mutation

REDACTED = "<hidden>"
UNSUPPORTED_LINKS = ("Roles", "ServiceIdentities", "NodeIdentities", "TemplatedPolicies",
                     "AuthMethod", "ExpirationTime", "ExpirationTTL")

_LINK = Schema("structs.ACLTokenPolicyLink", {"ID": "str", "Name": "str"})
POLICY_SCHEMA = Schema("structs.ACLPolicy", {
    "ID": "str", "Name": "str", "Description": "str", "Rules": "str",
    "Datacenters": ("list", "str"), "Hash": "any", "CreateIndex": "int", "ModifyIndex": "int",
    "Namespace": "str", "Partition": "str",
})
TOKEN_SCHEMA = Schema("structs.ACLToken", {
    "AccessorID": "str", "SecretID": "str", "Description": "str",
    "Policies": ("list", _LINK), "Roles": "any", "ServiceIdentities": "any",
    "NodeIdentities": "any", "TemplatedPolicies": "any", "Local": "bool", "AuthMethod": "str",
    "ExpirationTime": "any", "ExpirationTTL": "any", "CreateTime": "any", "Hash": "any",
    "CreateIndex": "int", "ModifyIndex": "int", "Namespace": "str", "Partition": "str",
})
BOOTSTRAP_SCHEMA = Schema("api.BootstrapRequest", {"BootstrapSecret": "str"})


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _decode(schema: Schema, body: bytes, what: str) -> dict[str, Any]:
    try:
        return decode_body(schema, body)
    except DecodeError as exc:
        raise ApiError(400, exc.text.replace("Request decode failed",
                                             f"{what} decoding failed")) from exc


class AclApi(ApiBase):
    def routes(self) -> list[Route]:
        return [
            route("/v1/acl/bootstrap", PUT=self.bootstrap),
            route("/v1/acl/policy", PUT=self.policy_create),
            route("/v1/acl/policy/*", GET=self.policy_read, PUT=self.policy_update,
                  DELETE=self.policy_delete),
            route("/v1/acl/policy/name/*", GET=self.policy_read_by_name),
            route("/v1/acl/policies", GET=self.policy_list),
            route("/v1/acl/token", PUT=self.token_create),
            route("/v1/acl/token/*", GET=self.token_read, PUT=self.token_update,
                  DELETE=self.token_delete),
            route("/v1/acl/token/self", GET=self.token_self),
            route("/v1/acl/tokens", GET=self.token_list),
            route("/v1/agent/token/*", PUT=self.agent_token),
        ]

    def _enabled(self) -> None:
        if not self.acl.enabled:
            raise ApiError(401, "ACL support disabled")

    def _acl(self, request: Request, level: str) -> Authorizer:
        self._enabled()
        self._common(request)
        authz = self.authz(request)
        authz.require("acl", level)
        return authz

    # --- rendering -------------------------------------------------------------------------------

    def policy_links(self, token: AclToken) -> list[dict[str, str]]:
        """Links by ID with today's names; links to deleted policies are left out."""
        return [{"ID": p, "Name": self.state.acl_policies[p].name}
                for p in token.policies if p in self.state.acl_policies]

    def token_json(self, token: AclToken, *, redact: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"AccessorID": token.accessor_id,
                               "SecretID": REDACTED if redact else token.secret_id,
                               "Description": token.description}
        links = self.policy_links(token)
        if links:
            out["Policies"] = links
        out.update(Local=token.local, CreateTime=token.create_time, Hash=token.hash,
                   CreateIndex=token.create_index, ModifyIndex=token.modify_index)
        return out

    @staticmethod
    def policy_json(policy: AclPolicy, *, stub: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"ID": policy.id, "Name": policy.name,
                               "Description": policy.description}
        if not stub:
            out["Rules"] = policy.rules
        if policy.datacenters or stub:
            out["Datacenters"] = list(policy.datacenters) or None
        out.update(Hash=policy.hash, CreateIndex=policy.create_index,
                   ModifyIndex=policy.modify_index)
        return out

    def _acl_read(self, request: Request, body: Any) -> Read:
        return Read(json_response(request, body), index=self.state.table("acl"),
                    topics=("acl",))

    # --- bootstrap -------------------------------------------------------------------------------

    def bootstrap(self, request: Request, tail: str) -> Write:
        self._enabled()
        body = _decode(BOOTSTRAP_SCHEMA, request.body, "Request") if request.body else {}
        secret = body.get("BootstrapSecret") or str(uuid.uuid4())
        accessor, created = str(uuid.uuid4()), _now()

        def respond(mutation: Mutation) -> Response:
            token: AclToken = mutation.result
            return json_response(request, {"ID": token.secret_id, **self.token_json(token)})

        return Write(lambda s, now: s.plan_acl_bootstrap(accessor=accessor, secret=secret,
                                                         created=created), respond)

    # --- policies --------------------------------------------------------------------------------

    def policy_list(self, request: Request, tail: str) -> Read:
        self._acl(request, "read")
        policies = sorted(self.state.acl_policies.values(), key=lambda p: (p.create_index, p.id))
        return self._acl_read(request, [self.policy_json(p, stub=True) for p in policies])

    def _policy_answer(self, request: Request, policy: AclPolicy | None) -> Read:
        if policy is None:
            return Read(Response.text("Requested policy does not exist: ACL not found", 404))
        return self._acl_read(request, self.policy_json(policy))

    def policy_read(self, request: Request, tail: str) -> Read:
        self._acl(request, "read")
        if not tail:
            raise ApiError(400, "Missing policy ID")
        return self._policy_answer(request, self.state.acl_policies.get(tail))

    def policy_read_by_name(self, request: Request, tail: str) -> Read:
        self._acl(request, "read")
        if not tail:
            raise ApiError(400, "Missing policy Name")
        return self._policy_answer(request, self.state.policy_by_name(tail))

    def _policy_write(self, request: Request, policy_id: str | None) -> Write:
        self._enabled()
        body = _decode(POLICY_SCHEMA, request.body, "Policy")
        if policy_id is None and body.get("ID"):
            raise ApiError(400, "Cannot specify the ID when creating a new policy")
        if policy_id is not None:
            if body.get("ID") and body["ID"] != policy_id:
                raise ApiError(400, "Policy ID in URL and payload do not match")
            body["ID"] = policy_id
        self._acl(request, "write")
        new_id = str(uuid.uuid4()) if policy_id is None else None
        return Write(lambda s, now: s.plan_policy_set(body, new_id=new_id),
                     lambda m: json_response(request, self.policy_json(m.result)))

    def policy_create(self, request: Request, tail: str) -> Write:
        return self._policy_write(request, None)

    def policy_update(self, request: Request, tail: str) -> Write:
        return self._policy_write(request, tail)

    def policy_delete(self, request: Request, tail: str) -> Write:
        self._acl(request, "write")
        if not tail:
            raise ApiError(400, "Missing policy ID")
        return Write(lambda s, now: s.plan_policy_delete(tail),
                     lambda m: json_response(request, True))

    # --- tokens ----------------------------------------------------------------------------------

    def token_list(self, request: Request, tail: str) -> Read:
        authz = self._acl(request, "read")
        redact = not authz.can("acl", "write")
        wanted_policy = request.param("policy") or ""
        tokens = sorted(self.state.acl_tokens.values(),
                        key=lambda t: (t.create_index, t.accessor_id))
        body = [self.token_json(t, redact=redact) for t in tokens
                if not wanted_policy or wanted_policy in t.policies]
        return self._acl_read(request, body)

    def token_self(self, request: Request, tail: str) -> Read:
        self._enabled()
        secret = request_token(request)
        token = self.acl.resolve(secret)
        if token is None:
            raise ApiError(403, "ACL not found")
        return self._acl_read(request, self.token_json(token))

    def token_read(self, request: Request, tail: str) -> Read:
        authz = self._acl(request, "read")
        if not tail:
            raise ApiError(400, "Missing token AccessorID")
        token = self.state.acl_tokens.get(tail)
        if token is None:
            return Read(Response.text("Requested token does not exist: ACL not found", 404))
        return self._acl_read(request, self.token_json(token,
                                                       redact=not authz.can("acl", "write")))

    def _token_write(self, request: Request, accessor: str | None) -> Write:
        self._enabled()
        body = _decode(TOKEN_SCHEMA, request.body, "Token")
        if accessor is not None:
            body.setdefault("AccessorID", accessor)
            if not body["AccessorID"]:
                body["AccessorID"] = accessor
            if body["AccessorID"] != accessor:
                raise ApiError(400, "Token Accessor ID in URL and payload do not match")
        self._acl(request, "write")
        unsupported = [k for k in UNSUPPORTED_LINKS if body.get(k)]
        if unsupported:
            raise ApiError(400, f"{', '.join(unsupported)}: not supported by the embedded "
                                "registry (link policies instead)")
        create = accessor is None
        new_accessor, new_secret, created = str(uuid.uuid4()), str(uuid.uuid4()), _now()

        def plan(state: RegistryState, now: float) -> Mutation:
            return state.plan_token_set(body, create=create, new_accessor=new_accessor,
                                        new_secret=new_secret, created=created)

        return Write(plan, lambda m: json_response(request, self.token_json(m.result)))

    def token_create(self, request: Request, tail: str) -> Write:
        return self._token_write(request, None)

    def token_update(self, request: Request, tail: str) -> Write:
        if not tail:
            raise ApiError(400, "Missing token AccessorID")
        return self._token_write(request, tail)

    def token_delete(self, request: Request, tail: str) -> Write:
        self._acl(request, "write")
        if not tail:
            raise ApiError(400, "Missing token AccessorID")
        secret = request_token(request)
        return Write(lambda s, now: s.plan_token_delete(tail, request_secret=secret),
                     lambda m: json_response(request, True))

    # --- agent tokens ----------------------------------------------------------------------------

    def agent_token(self, request: Request, tail: str) -> Read:
        self._enabled()
        self.authz(request).require("agent", "write", self.node.name)
        return Read(Response(200, b"", []))  # accepted; the registry uses no agent tokens
