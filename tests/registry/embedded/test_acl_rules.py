"""Consul ACL policy rules, HCL and JSON: the pure parser, by tables."""

from __future__ import annotations

import pytest

from meshd.registry.embedded.acl_rules import Rule, RulesError, parse_rules

MESHD_HOST = '''
# a meshd host: its node, its services, reads the mesh config
node "host-a" { policy = "write" }
service "web" { policy = "write" }
service_prefix "" { policy = "read" }
key_prefix "meshd/config/" { policy = "read" }  // signed by an operator
'''


@pytest.mark.parametrize(("text", "rules", "globals_"), [
    ("", (), {}),
    ("  \n# only a comment\n", (), {}),
    ('key "a" { policy = "read" }', (Rule("key", "a", False, "read"),), {}),
    ('key_prefix "" {\n  policy = "list"\n}', (Rule("key", "", True, "list"),), {}),
    ('service "web" { policy = "write", intentions = "deny" }',
     (Rule("service", "web", False, "write", "deny"),), {}),
    ('node_prefix "h" { policy = "deny" }\nagent "x" { policy = "read" }',
     (Rule("node", "h", True, "deny"), Rule("agent", "x", False, "read")), {}),
    ('session_prefix "" { policy = "write" } query "q" { policy = "read" }',
     (Rule("session", "", True, "write"), Rule("query", "q", False, "read")), {}),
    ('acl = "read"\noperator = "write"\nkeyring = "deny"', (),
     {"acl": "read", "operator": "write", "keyring": "deny"}),
    ("/* block\ncomment */ event_prefix \"\" { policy = \"read\" }",
     (Rule("event", "", True, "read"),), {}),
    # the same name twice merges as Consul merges policies: deny > write > list > read
    ('key "a" { policy = "read" }\nkey "a" { policy = "deny" }\nkey "a" { policy = "write" }',
     (Rule("key", "a", False, "deny"),), {}),
    # unknown names and fields are ignored, as HCL's decoder does
    ('mesh = "write"\npeering = "read"\nservice "s" { policy = "read" extra = "x" }',
     (Rule("service", "s", False, "read"),), {}),
    # JSON form, with labels as an object or a list of objects
    ('{"key_prefix": {"meshd/config/": {"policy": "read"}}, "operator": "read"}',
     (Rule("key", "meshd/config/", True, "read"),), {"operator": "read"}),
    ('{"service": [{"web": {"policy": "write"}}, {"api": {"Policy": "read"}}]}',
     (Rule("service", "web", False, "write"), Rule("service", "api", False, "read")), {}),
])
def test_rules_parse(text: str, rules: tuple[Rule, ...], globals_: dict[str, str]) -> None:
    parsed = parse_rules(text)
    assert parsed.rules == rules
    assert dict(parsed.globals) == globals_


def test_meshd_host_rules_parse_the_same_from_hcl_and_json() -> None:
    as_json = ('{"node": {"host-a": {"policy": "write"}}, "service": {"web": {"policy": '
               '"write"}}, "service_prefix": {"": {"policy": "read"}}, "key_prefix": '
               '{"meshd/config/": {"policy": "read"}}}')
    assert parse_rules(MESHD_HOST) == parse_rules(as_json)


@pytest.mark.parametrize(("text", "error"), [
    ('service "web" { policy = "admin" }',
     'Invalid service policy: acl.ServiceRule{Name:"web", Policy:"admin", '),
    ('service "web" { service = "write" }', 'Invalid service policy: acl.ServiceRule{Name:"web"'),
    ('node "n" { policy = "list" }', "Invalid node policy: acl.NodeRule{"),
    ('key "k" { policy = "lsit" }', "Invalid key policy: acl.KeyRule{"),
    ('service "w" { policy = "read" intentions = "all" }',
     "Invalid service intentions policy: "),
    ('agent_prefix "" { policy = "" }', "Invalid agent_prefix policy: acl.AgentRule{"),
    ('acl = "list"', 'Invalid acl policy: "list"'),
    ('operator = "sudo"', 'Invalid operator policy: "sudo"'),
    ('key "k" { policy = "read"', "Failed to parse ACL rules: At 1:26: "),
    ('key "k" policy = "read" }', "Failed to parse ACL rules: At 1:9: "),
    ("key k { }", "Failed to parse ACL rules: At 1:5: "),
    ('key "k" { policy = read }', "Failed to parse ACL rules: At 1:20: "),
    ('key "k" { policy = "read" } @', "Failed to parse ACL rules: At 1:29: "),
    ('{"key": ', "Failed to parse ACL rules: "),
    ('{"acl": 1}', "Failed to parse ACL rules: "),
])
def test_bad_rules_give_consuls_errors(text: str, error: str) -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(text)
    assert str(caught.value).startswith(error), str(caught.value)
