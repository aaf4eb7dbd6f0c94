"""ACL decisions (exact beats prefix, longest prefix, deny first, default policy): the pure
core, by tables."""

from __future__ import annotations

import pytest
from test_acl_rules import MESHD_HOST

from meshd.registry.embedded.acl import Authorizer, compile_rules
from meshd.registry.embedded.acl_rules import PolicyRules, parse_rules


def _authz(*texts: str, default_allow: bool = False) -> Authorizer:
    return Authorizer(enabled=True, table=compile_rules(parse_rules(t) for t in texts),
                      default_allow=default_allow, accessor="a")


DECISIONS = [
    # (rules, resource, level, name, allowed)
    (MESHD_HOST, "key", "read", "meshd/config/routes", True),
    (MESHD_HOST, "key", "write", "meshd/config/routes", False),
    (MESHD_HOST, "key", "read", "meshd/secrets", False),  # no rule: default deny
    (MESHD_HOST, "service", "write", "web", True),
    (MESHD_HOST, "service", "write", "payments", False),  # only read from the prefix
    (MESHD_HOST, "service", "read", "payments", True),
    (MESHD_HOST, "node", "write", "host-a", True),
    (MESHD_HOST, "node", "write", "host-b", False),
    (MESHD_HOST, "node", "read", "host-b", False),
    (MESHD_HOST, "intention", "read", "web", True),  # derived from service rules
    (MESHD_HOST, "intention", "write", "web", False),
    (MESHD_HOST, "acl", "read", "", False),
    # exact beats prefix, even a weaker exact rule
    ('key_prefix "a/" { policy = "write" }\nkey "a/b" { policy = "read" }',
     "key", "write", "a/b", False),
    ('key_prefix "a/" { policy = "write" }\nkey "a/b" { policy = "read" }',
     "key", "write", "a/bc", True),
    # the longest prefix wins
    ('key_prefix "a/" { policy = "deny" }\nkey_prefix "a/b/" { policy = "write" }',
     "key", "write", "a/b/c", True),
    ('key_prefix "a/" { policy = "write" }\nkey_prefix "a/b/" { policy = "deny" }',
     "key", "read", "a/b/c", False),
    ('key_prefix "" { policy = "read" }', "key", "read", "anything", True),
    # list grants read and list, read grants read, write grants all
    ('key_prefix "" { policy = "list" }', "key", "list", "x", True),
    ('key_prefix "" { policy = "list" }', "key", "read", "x", True),
    ('key_prefix "" { policy = "list" }', "key", "write", "x", False),
    ('key_prefix "" { policy = "read" }', "key", "list", "x", False),
    ('service "s" { policy = "deny" }', "service", "read", "s", False),
    ('service "s" { policy = "write" intentions = "write" }', "intention", "write", "s", True),
    ('agent_prefix "" { policy = "read" }', "agent", "read", "meshd-registry", True),
    ('session_prefix "host-" { policy = "write" }', "session", "write", "host-a", True),
    ('acl = "read"', "acl", "read", "", True),
    ('acl = "read"', "acl", "write", "", False),
    ('operator = "write"', "operator", "read", "", True),
]


@pytest.mark.parametrize(("rules", "resource", "level", "name", "allowed"), DECISIONS)
def test_decisions(rules: str, resource: str, level: str, name: str, allowed: bool) -> None:
    assert _authz(rules).can(resource, level, name) is allowed


def test_policies_merge_deny_first_at_the_same_specificity() -> None:
    read = 'key_prefix "app/" { policy = "write" }'
    deny = 'key_prefix "app/" { policy = "deny" }'
    assert not _authz(read, deny).can("key", "read", "app/x")
    assert not _authz(deny, read).can("key", "read", "app/x")
    write, list_ = 'key "k" { policy = "write" }', 'key "k" { policy = "list" }'
    assert _authz(list_, write).can("key", "write", "k")


def test_default_policy_fills_in_where_no_rule_says() -> None:
    rules = 'service "web" { policy = "deny" }'
    allow = _authz(rules, default_allow=True)
    assert allow.can("key", "write", "x") and allow.can("operator", "write")
    assert not allow.can("service", "read", "web")
    assert not allow.can("acl", "read")  # allow-all never manages ACLs
    assert not _authz(rules).can("key", "read", "x")


@pytest.mark.parametrize(("rules", "prefix", "allowed"), [
    ('key_prefix "a/" { policy = "write" }', "a/", True),
    ('key_prefix "a/" { policy = "write" }', "a/b/", True),
    ('key_prefix "a/" { policy = "write" }\nkey "a/keep" { policy = "read" }', "a/", False),
    ('key_prefix "a/" { policy = "write" }\nkey_prefix "a/x/" { policy = "deny" }', "a/", False),
    ('key_prefix "a/" { policy = "read" }', "a/", False),
    ('key "a/b" { policy = "write" }', "a/", False),  # no applicable prefix: default deny
])
def test_delete_tree_needs_write_on_everything_under_it(rules: str, prefix: str,
                                                        allowed: bool) -> None:
    assert _authz(rules).can_write_prefix(prefix) is allowed


def test_management_and_acls_off_allow_everything() -> None:
    for authz in (Authorizer(enabled=False), Authorizer(enabled=True, management=True)):
        assert authz.can("acl", "write") and authz.can_write_prefix("")
    assert compile_rules([PolicyRules()]).access("key", "x") is None


def test_denial_texts_are_consuls() -> None:
    authz = _authz(MESHD_HOST)
    with pytest.raises(Exception) as caught:
        authz.require("key", "write", "meshd/config/routes")
    assert str(caught.value) == ("Permission denied: token with AccessorID 'a' lacks permission "
                                 "'key:write' on \"meshd/config/routes\"")
