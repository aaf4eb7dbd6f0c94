"""ACL policies, tokens and the bootstrap marker as records, and every ACL write as a pure plan
(docs/consul-api.md §1.5).

The checks and their texts are Consul's (``agent/consul/acl_endpoint.go``): Consul answers these
refusals with 500 and the text, as it does for most RPC-side validation, and so does this
registry. IDs, secrets and creation times come from the caller (the endpoint), so a plan is a
pure function of the state and its arguments.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from meshd.registry.embedded.acl_rules import RulesError, parse_rules
from meshd.registry.embedded.store.core import StateCore
from meshd.registry.embedded.store.records import (
    AclBootstrap,
    AclPolicy,
    AclToken,
    ApiError,
    Mutation,
    Op,
)

MANAGEMENT_POLICY_ID = "00000000-0000-0000-0000-000000000001"
MANAGEMENT_POLICY_NAME = "global-management"
ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
ANONYMOUS_SECRET = "anonymous"
# What Consul's builtin policy grants, written out as rules (it is shown, never parsed for
# decisions: a token linked to it is a management token).
MANAGEMENT_RULES = "\n".join([
    'acl = "write"', 'operator = "write"', 'keyring = "write"',
    *(f'{block} "" {{\n  policy = "write"\n}}' for block in (
        "agent_prefix", "event_prefix", "key_prefix", "node_prefix", "query_prefix",
        "session_prefix")),
    'service_prefix "" {\n  policy = "write"\n  intentions = "write"\n}',
])
_VALID_NAME = re.compile(r"^[A-Za-z0-9\-_]{1,128}$")


def _digest(*parts: Any) -> str:
    raw = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return base64.b64encode(hashlib.sha256(raw).digest()).decode("ascii")


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower() and len(text) == 36
    except ValueError:
        return False


def management_policy(index: int) -> AclPolicy:
    return AclPolicy(id=MANAGEMENT_POLICY_ID, name=MANAGEMENT_POLICY_NAME,
                     description="Builtin Policy that grants unlimited access",
                     rules=MANAGEMENT_RULES, hash=_digest("policy", MANAGEMENT_RULES),
                     create_index=index, modify_index=index)


def token_hash(token: AclToken) -> str:
    return _digest("token", token.description, list(token.policies), token.local)


class AclWrites(StateCore):
    # --- reads -----------------------------------------------------------------------------------

    def token_by_secret(self, secret: str) -> AclToken | None:
        accessor = self.acl_secrets.get(secret)
        return self.acl_tokens.get(accessor) if accessor is not None else None

    def policy_by_name(self, name: str) -> AclPolicy | None:
        return next((p for p in self.acl_policies.values() if p.name == name), None)

    # --- standing state --------------------------------------------------------------------------

    def plan_acl_boot(self, *, initial_management: str | None, initial_accessor: str,
                      created: str) -> Mutation:
        """With ACLs on: the builtin policy, the anonymous token, and the initial management
        token (which, as in Consul, uses up the bootstrap) unless they exist already."""
        index = self.index + 1
        ops: list[Op] = []
        if MANAGEMENT_POLICY_ID not in self.acl_policies:
            ops.append(Op("acl-policy", MANAGEMENT_POLICY_ID, management_policy(index)))
        if ANONYMOUS_ACCESSOR not in self.acl_tokens:
            anonymous = AclToken(
                accessor_id=ANONYMOUS_ACCESSOR, secret_id=ANONYMOUS_SECRET,
                description="Anonymous Token", create_time=created, create_index=index,
                modify_index=index)
            ops.append(Op("acl-token", ANONYMOUS_ACCESSOR,
                          replace(anonymous, hash=token_hash(anonymous))))
        if initial_management and self.token_by_secret(initial_management) is None:
            token = AclToken(accessor_id=initial_accessor, secret_id=initial_management,
                             description="Initial Management Token",
                             policies=(MANAGEMENT_POLICY_ID,), create_time=created,
                             create_index=index, modify_index=index)
            ops.append(Op("acl-token", initial_accessor, replace(token, hash=token_hash(token))))
            if self.acl_bootstrap is None:
                ops.append(Op("acl-meta", "bootstrap", AclBootstrap(index, index, index)))
        return Mutation(index=index if ops else 0, ops=tuple(ops))

    def plan_acl_bootstrap(self, *, accessor: str, secret: str, created: str) -> Mutation:
        """``PUT /v1/acl/bootstrap``: once; the result is the new management token."""
        if self.acl_bootstrap is not None:
            raise ApiError(403, "Permission denied: ACL bootstrap no longer allowed (reset index: "
                                f"{self.acl_bootstrap.reset_index})")
        if secret in self.acl_secrets:
            raise ApiError(500, "Invalid Token: SecretID is already in use")
        index = self.index + 1
        token = AclToken(accessor_id=accessor, secret_id=secret,
                         description="Bootstrap Token (Global Management)",
                         policies=(MANAGEMENT_POLICY_ID,), create_time=created,
                         create_index=index, modify_index=index)
        token = replace(token, hash=token_hash(token))
        return Mutation(index=index, ops=(
            Op("acl-token", accessor, token),
            Op("acl-meta", "bootstrap", AclBootstrap(index, index, index)),
        ), result=token)

    # --- policies --------------------------------------------------------------------------------

    def plan_policy_set(self, definition: Mapping[str, Any], *, new_id: str | None) -> Mutation:
        """Create (``new_id`` given) or update (``definition["ID"]``) a policy."""
        name = str(definition.get("Name") or "")
        if not name:
            raise ApiError(500, "Invalid Policy: no Name is set")
        if not _VALID_NAME.match(name):
            raise ApiError(500, "Invalid Policy: invalid Name. Only alphanumeric characters, "
                                "'-' and '_' are allowed")
        policy_id = new_id or str(definition.get("ID") or "")
        named = self.policy_by_name(name)
        existing = None
        if new_id is None:
            if not _is_uuid(policy_id):
                raise ApiError(500, "Policy ID invalid UUID")
            existing = self.acl_policies.get(policy_id)
            if existing is None:
                raise ApiError(500, f"cannot find policy {policy_id}")
            if existing.name != name and named is not None:
                raise ApiError(500, f"Invalid Policy: A policy with name {json.dumps(name)} "
                                    "already exists")
        elif named is not None:
            raise ApiError(500, f"Invalid Policy: A Policy with Name {json.dumps(name)} already "
                                "exists")
        rules = str(definition.get("Rules") or "")
        datacenters = tuple(definition.get("Datacenters") or ())
        if existing is not None and existing.id == MANAGEMENT_POLICY_ID:
            if datacenters:
                raise ApiError(500, "Changing the Datacenters of the builtin global-management "
                                    "policy is not permitted")
            if rules != existing.rules:
                raise ApiError(500, "Changing the Rules for the builtin global-management "
                                    "policy is not permitted")
        try:
            parse_rules(rules)
        except RulesError as exc:
            raise ApiError(500, str(exc)) from exc
        index = self.index + 1
        policy = AclPolicy(
            id=policy_id, name=name, description=str(definition.get("Description") or ""),
            rules=rules, datacenters=datacenters,
            hash=_digest("policy", name, rules, list(datacenters)),
            create_index=existing.create_index if existing is not None else index,
            modify_index=index)
        return Mutation(index=index, ops=(Op("acl-policy", policy_id, policy),), result=policy)

    def plan_policy_delete(self, policy_id: str) -> Mutation:
        policy = self.acl_policies.get(policy_id)
        if policy is None:
            return Mutation(result=True)
        if policy_id == MANAGEMENT_POLICY_ID:
            raise ApiError(500, "Delete operation not permitted on the builtin global-management "
                                "policy")
        index = self.index + 1
        # Tokens keep the dangling link; Consul drops it when the token is read, and so does
        # the renderer here (``policy_links``).
        return Mutation(index=index, ops=(Op("acl-policy", policy_id, None),), result=True)

    # --- tokens ----------------------------------------------------------------------------------

    def _policy_ids(self, links: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
        ids: list[str] = []
        for link in links:
            policy_id = str(link.get("ID") or "")
            if not policy_id:
                name = str(link.get("Name") or "")
                found = self.policy_by_name(name)
                if found is None:
                    raise ApiError(500, f"No such ACL policy with name {json.dumps(name)}")
                policy_id = found.id
            elif policy_id not in self.acl_policies:
                raise ApiError(500, f"No such ACL policy with ID {json.dumps(policy_id)}")
            if policy_id not in ids:
                ids.append(policy_id)
        return tuple(ids)

    def plan_token_set(self, definition: Mapping[str, Any], *, create: bool, new_accessor: str,
                       new_secret: str, created: str) -> Mutation:
        accessor = str(definition.get("AccessorID") or "")
        secret = str(definition.get("SecretID") or "")
        existing = None
        if create:
            if accessor:
                if not _is_uuid(accessor):
                    raise ApiError(500, "Invalid Token: AccessorID is not a valid UUID")
                if accessor in self.acl_tokens or accessor == ANONYMOUS_ACCESSOR:
                    raise ApiError(500, "Invalid Token: AccessorID is already in use")
            else:
                accessor = new_accessor
            if secret:
                if not _is_uuid(secret):
                    raise ApiError(500, "Invalid Token: SecretID is not a valid UUID")
                if secret in self.acl_secrets:
                    raise ApiError(500, "Invalid Token: SecretID is already in use")
            else:
                secret = new_secret
        else:
            if not _is_uuid(accessor):
                raise ApiError(500, "Invalid Token: AccessorID is not a valid UUID")
            existing = self.acl_tokens.get(accessor)
            if existing is None:
                raise ApiError(500, f"Cannot find token {json.dumps(accessor)}")
            if secret and secret != existing.secret_id:
                raise ApiError(500, "Changing a tokens SecretID is not permitted")
            secret = existing.secret_id
            if "Local" in definition and bool(definition["Local"]) != existing.local:
                raise ApiError(500, f"Cannot toggle local mode of {accessor}")
        policies = self._policy_ids(definition.get("Policies") or ())
        index = self.index + 1
        token = AclToken(
            accessor_id=accessor, secret_id=secret,
            description=str(definition.get("Description") or ""), policies=policies,
            local=bool(definition.get("Local", existing.local if existing else False)),
            create_time=existing.create_time if existing is not None else created,
            create_index=existing.create_index if existing is not None else index,
            modify_index=index)
        token = replace(token, hash=token_hash(token))
        return Mutation(index=index, ops=(Op("acl-token", accessor, token),), result=token)

    def plan_token_delete(self, accessor: str, *, request_secret: str) -> Mutation:
        if not _is_uuid(accessor):
            raise ApiError(500, "Accessor ID is missing or an invalid UUID")
        if accessor == ANONYMOUS_ACCESSOR:
            raise ApiError(500, "Delete operation not permitted on the anonymous token")
        token = self.acl_tokens.get(accessor)
        if token is None:
            return Mutation(result=True)
        if token.secret_id == request_secret:
            raise ApiError(500, "Deletion of the request's authorization token is not permitted")
        index = self.index + 1
        return Mutation(index=index, ops=(Op("acl-token", accessor, None),), result=True)
