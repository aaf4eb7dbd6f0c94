"""ACL decisions of the embedded registry: who a request is, and what it may do
(docs/consul-api.md §1.5). No I/O.

A request's token (``?token=``, ``X-Consul-Token``, ``Authorization: Bearer``) is resolved
against the stored tokens: none means the anonymous token, an unknown secret is refused with 403
``ACL not found``. The token's policies are merged into one ``RuleTable`` (``compile_rules``)
and every question is answered by ``Authorizer.can(resource, level, name)`` the way Consul's
policy authorizer answers it:

- for segmented resources (key, service, node, agent, session, event, query, and intention,
  derived from service rules) an exact rule for the name wins; otherwise the longest prefix
  rule; rules naming the same thing in several policies merge deny > write > list > read;
- ``write`` grants read, list and write; ``list`` grants read and list; ``read`` grants read;
  ``deny`` grants nothing; no rule at all falls back to the default policy;
- ``acl``, ``operator`` and ``keyring`` are single rules; ``acl`` with no rule is denied even
  under default ``allow`` (Consul's allow-all authorizer does not manage ACLs);
- a token linked to the builtin ``global-management`` policy may do everything.

With ACLs off every request is allowed and supplied tokens are ignored.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from meshd.httpd import Request
from meshd.registry.embedded.acl_rules import (
    PolicyRules,
    Rule,
    RulesError,
    merge_rule,
    parse_rules,
    strongest,
)
from meshd.registry.embedded.state import RegistryState
from meshd.registry.embedded.store.acl import (
    ANONYMOUS_ACCESSOR,
    ANONYMOUS_SECRET,
    MANAGEMENT_POLICY_ID,
)
from meshd.registry.embedded.store.records import AclToken, ApiError

__all__ = ["ANONYMOUS_ACCESSOR", "ANONYMOUS_SECRET", "AclConfig", "AclResolver", "Authorizer",
           "RuleTable", "compile_rules", "request_token"]

READ, LIST, WRITE = "read", "list", "write"
LEVELS = (READ, LIST, WRITE)


def request_token(request: Request) -> str:
    """``?token=``, then ``X-Consul-Token``, then ``Authorization: Bearer``."""
    token = request.param("token")
    if token:
        return token
    token = request.header("x-consul-token")
    if token:
        return token
    auth = request.header("authorization") or ""
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return ""


def initial_management_accessor(secret: str) -> str:
    """A stable AccessorID for the configured initial management token that does not reveal its
    secret."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "meshd-registry-master:" + secret))


# --- the decision core ---------------------------------------------------------------------

@dataclass(frozen=True)
class RuleTable:
    """A token's rules, merged: per resource the exact and the prefix rules by segment."""

    exact: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    prefix: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    globals: Mapping[str, str] = field(default_factory=dict)

    def access(self, resource: str, name: str) -> str | None:
        """The access level the most specific rule gives ``name``, None without a rule."""
        exact = self.exact.get(resource, {}).get(name)
        if exact is not None:
            return exact
        prefixes = self.prefix.get(resource, {})
        best: str | None = None
        best_len = -1
        for segment, access in prefixes.items():
            if name.startswith(segment) and len(segment) > best_len:
                best, best_len = access, len(segment)
        return best

    def write_prefix(self, prefix: str) -> bool | None:
        """Consul's KeyWritePrefix: the applicable prefix rule grants write and no rule under
        ``prefix`` withholds it. None: no rule applies at all (default policy)."""
        keys = self.prefix.get("key", {})
        base: bool | None = None
        best_len = -1
        for segment, access in keys.items():
            if prefix.startswith(segment) and len(segment) > best_len:
                base, best_len = access == WRITE, len(segment)
        if base is False:
            return False
        under = [a for table in (keys, self.exact.get("key", {}))
                 for s, a in table.items() if s.startswith(prefix)]
        if any(a != WRITE for a in under):
            return False
        return base


def _intention(rule: Rule) -> str:
    if rule.intentions:
        return rule.intentions
    return READ if rule.policy in (READ, WRITE) else "deny"


def compile_rules(policies: Iterable[PolicyRules]) -> RuleTable:
    merged: dict[tuple[str, str, bool], Rule] = {}
    globals_: dict[str, str] = {}
    for policy in policies:
        for rule in policy.rules:
            key = (rule.resource, rule.segment, rule.prefix)
            merged[key] = merge_rule(merged.get(key), rule)
        for name, access in policy.globals.items():
            globals_[name] = strongest(globals_.get(name), access)
    exact: dict[str, dict[str, str]] = {}
    prefix: dict[str, dict[str, str]] = {}
    for rule in merged.values():
        target = prefix if rule.prefix else exact
        target.setdefault(rule.resource, {})[rule.segment] = rule.policy
        if rule.resource == "service":
            target.setdefault("intention", {})[rule.segment] = _intention(rule)
    return RuleTable(exact, prefix, globals_)


def grants(access: str, level: str) -> bool:
    """Consul's ``enforce``: write grants all, list grants read and list, read grants read."""
    if access == WRITE:
        return True
    if access == LIST:
        return level in (READ, LIST)
    if access == READ:
        return level == READ
    return False


@dataclass(frozen=True)
class Authorizer:
    enabled: bool
    management: bool = False
    table: RuleTable = field(default_factory=RuleTable)
    default_allow: bool = True
    accessor: str = ANONYMOUS_ACCESSOR
    token_given: bool = False  # the request named a token (filtered lists then say so)

    @property
    def can_do_everything(self) -> bool:
        return not self.enabled or self.management

    def can(self, resource: str, level: str, name: str = "") -> bool:
        if not self.enabled or self.management:
            return True
        if resource in ("acl", "operator", "keyring"):
            access = self.table.globals.get(resource)
            if access is None:
                return self.default_allow and resource != "acl"
            return grants(access, level)
        access = self.table.access(resource, name)
        if access is None:
            return self.default_allow
        return grants(access, level)

    def can_write_prefix(self, prefix: str) -> bool:
        if not self.enabled or self.management:
            return True
        decision = self.table.write_prefix(prefix)
        return self.default_allow if decision is None else decision

    def denial(self, resource: str, level: str, name: str | None = None) -> ApiError:
        """Consul's 403 text (acl/errors.go ``PermissionDeniedError``)."""
        if self.accessor == ANONYMOUS_ACCESSOR:
            text = "Permission denied: anonymous token"
        else:
            text = f"Permission denied: token with AccessorID '{self.accessor}'"
        text += f" lacks permission '{resource}:{level}'"
        if name:
            text += f' on "{name}"'
        if self.accessor == ANONYMOUS_ACCESSOR:
            text += (". The anonymous token is used implicitly when a request does not specify "
                     "a token.")
        return ApiError(403, text)

    def require(self, resource: str, level: str, name: str | None = None) -> None:
        """Raise Consul's 403 unless this token may ``level`` the ``resource`` ``name``."""
        if not self.can(resource, level, name or ""):
            raise self.denial(resource, level, name)

    def require_write_prefix(self, prefix: str) -> None:
        if not self.can_write_prefix(prefix):
            raise self.denial("key", WRITE, prefix)


ACLS_OFF = Authorizer(enabled=False)


# --- resolution against the stored tokens ------------------------------------------------------

@dataclass(frozen=True)
class AclConfig:
    enabled: bool = False
    default_policy: str = "allow"  # Consul's default once ACLs are enabled
    initial_management: str | None = None

    @classmethod
    def from_master_token(cls, master: str | None) -> AclConfig:
        """The deprecated ``--acl-master-token``: enabled, default deny, that token."""
        if not master:
            return cls()
        return cls(enabled=True, default_policy="deny", initial_management=master)


class AclResolver:
    """Token resolution for one registry. Compiled rules are cached per policy revision."""

    def __init__(self, config: AclConfig, state: RegistryState) -> None:
        self.config = config
        self.state = state
        self._compiled: dict[tuple[str, int], PolicyRules] = {}

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def default_policy(self) -> str:
        return self.config.default_policy if self.enabled else "allow"

    def resolve(self, secret: str) -> AclToken | None:
        """The token a secret names; the anonymous token for ""; None when unknown."""
        state = self.state
        if not secret:
            secret = ANONYMOUS_SECRET
        found = state.token_by_secret(secret)
        if found is None:
            # constant-time compare for the configured initial management token
            initial = self.config.initial_management
            if initial and hmac.compare_digest(secret.encode(), initial.encode()):
                return state.token_by_secret(initial)
        return found

    def authorizer_for(self, token: AclToken, *, token_given: bool) -> Authorizer:
        state = self.state
        if MANAGEMENT_POLICY_ID in token.policies:
            return Authorizer(enabled=True, management=True, accessor=token.accessor_id,
                              token_given=token_given)
        rules = []
        for policy_id in token.policies:
            policy = state.acl_policies.get(policy_id)
            if policy is None:
                continue  # a deleted policy: the link is dangling and grants nothing
            key = (policy.id, policy.modify_index)
            compiled = self._compiled.get(key)
            if compiled is None:
                try:
                    compiled = parse_rules(policy.rules)
                except RulesError:
                    compiled = PolicyRules()  # validated when written; never widen on error
                self._compiled[key] = compiled
            rules.append(compiled)
        return Authorizer(enabled=True, table=compile_rules(rules),
                          default_allow=self.config.default_policy == "allow",
                          accessor=token.accessor_id, token_given=token_given)

    def authorize(self, request: Request) -> Authorizer:
        if not self.enabled:
            return ACLS_OFF
        secret = request_token(request)
        token = self.resolve(secret)
        if token is None:
            raise ApiError(403, "ACL not found")
        return self.authorizer_for(token, token_given=bool(secret) and
                                   secret != ANONYMOUS_SECRET)

