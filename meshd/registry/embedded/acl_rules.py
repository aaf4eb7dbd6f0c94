"""Consul ACL policy rules: the text of a policy's ``Rules`` in, a validated ``PolicyRules`` out.
Pure code, no I/O (docs/consul-api.md §1.5).

Consul decodes rules with HCL 1 (JSON is valid HCL 1), so both forms are accepted here::

    # HCL: blocks with one quoted label, and top-level assignments
    key_prefix "meshd/config/" { policy = "read" }
    service "web" { policy = "write"  intentions = "read" }
    operator = "read"

    {"key_prefix": {"meshd/config/": {"policy": "read"}}, "operator": "read"}

The subset accepted, which is what Consul policies are written in:

- Block resources, each ``name "label" { ... }`` (label may be ""; a ``/* */``, ``#`` or ``//``
  comment anywhere whitespace may go): ``key``, ``key_prefix``, ``service``,
  ``service_prefix``, ``node``, ``node_prefix``, ``agent``, ``agent_prefix``, ``session``,
  ``session_prefix``, ``event``, ``event_prefix``, ``query``, ``query_prefix``. Inside:
  ``policy = "..."`` and, for services, ``intentions = "..."``; entries are separated by
  newlines or commas. The JSON form nests ``{"<name>": {"<label>": {"policy": ...}}}`` and
  also accepts a list of such label objects, as HCL's JSON decoder does.
- Assignments ``acl``, ``operator``, ``keyring`` = ``"read" | "write" | "deny"``.
- Policies: ``read``, ``write``, ``deny``; ``list`` as well for ``key``/``key_prefix``. As in
  Consul, an empty or missing ``policy`` is invalid, unknown top-level names and unknown fields
  inside a block are ignored, and the same label given twice is merged as Consul merges
  policies (``deny`` over ``write`` over ``list`` over ``read``).

Not accepted (an error rather than a guess): HCL heredocs, numbers or bools where a string is
expected, nested blocks other than the above, Sentinel ``code`` blocks (Enterprise).

Errors are Consul's texts, ``Failed to parse ACL rules: <where>: <what>`` for syntax (the
detail differs from HCL's) and ``Invalid <resource> policy: ...`` for a bad policy value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DENY, READ, LIST, WRITE = "deny", "read", "list", "write"
# Consul's precedence when two rules name the same thing (policy_merger.go): deny first
PRECEDENCE = {DENY: 3, WRITE: 2, LIST: 1, READ: 0}

# block name -> (resource, is prefix)
SEGMENTED = {
    "key": ("key", False), "key_prefix": ("key", True),
    "service": ("service", False), "service_prefix": ("service", True),
    "node": ("node", False), "node_prefix": ("node", True),
    "agent": ("agent", False), "agent_prefix": ("agent", True),
    "session": ("session", False), "session_prefix": ("session", True),
    "event": ("event", False), "event_prefix": ("event", True),
    "query": ("query", False), "query_prefix": ("query", True),
}
GLOBAL = ("acl", "operator", "keyring")
# Go's type and field names, for the %#v in Consul's "Invalid ... policy" errors
_GO_RULE = {"key": ("KeyRule", "Prefix"), "service": ("ServiceRule", "Name"),
            "node": ("NodeRule", "Name"), "agent": ("AgentRule", "Node"),
            "session": ("SessionRule", "Node"), "event": ("EventRule", "Event"),
            "query": ("PreparedQueryRule", "Prefix")}


class RulesError(ValueError):
    """Rules Consul would refuse; ``str()`` is Consul's error text."""


@dataclass(frozen=True)
class Rule:
    resource: str  # key, service, node, agent, session, event, query
    segment: str
    prefix: bool
    policy: str
    intentions: str = ""  # services only: "" means derived from policy


@dataclass(frozen=True)
class PolicyRules:
    rules: tuple[Rule, ...] = ()
    globals: Mapping[str, str] = field(default_factory=dict)  # acl, operator, keyring


def parse_rules(text: str) -> PolicyRules:
    """Parse and validate one policy's rules (HCL or JSON); raise ``RulesError``."""
    if not text.strip():
        return PolicyRules()
    if text.lstrip().startswith("{"):
        try:
            tree = json.loads(text)
        except ValueError as exc:
            raise RulesError(f"Failed to parse ACL rules: {exc}") from None
        if not isinstance(tree, dict):
            raise RulesError("Failed to parse ACL rules: expected a JSON object")
        items = list(_json_items(tree))
    else:
        items = _HclParser(text).parse()
    return _validate(items)


# --- JSON form ------------------------------------------------------------------------------------

Item = tuple[str, str | None, dict[str, Any] | str]  # (name, label, body) or (name, None, value)


def _json_items(tree: Mapping[str, Any]) -> Iterable[Item]:
    for name, value in tree.items():
        if name in GLOBAL:
            if not isinstance(value, str):
                raise RulesError(f"Failed to parse ACL rules: {name}: expected a string")
            yield name, None, value
        elif name in SEGMENTED:
            groups = value if isinstance(value, list) else [value]
            for group in groups:
                if not isinstance(group, dict):
                    raise RulesError(f"Failed to parse ACL rules: {name}: expected an object")
                for label, body in group.items():
                    if not isinstance(body, dict):
                        raise RulesError(f'Failed to parse ACL rules: {name} "{label}": '
                                         "expected an object")
                    yield name, label, body


# --- HCL subset -----------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+)
  | (?P<nl>\n)
  | (?P<comment>\#[^\n]*|//[^\n]*|/\*.*?\*/)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<ident>[A-Za-z_][A-Za-z0-9_\-.]*)
  | (?P<punct>[{}=,\[\]])
""", re.VERBOSE | re.DOTALL)


class _HclParser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str, int, int]] = []  # kind, text, line, column
        line, start, pos = 1, 0, 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None:
                raise self._error(line, pos - start + 1, f"illegal char {text[pos]!r}")
            kind = match.lastgroup or ""
            if kind in ("string", "ident", "punct", "nl"):
                self.tokens.append((kind, match.group(), line, pos - start + 1))
            newlines = match.group().count("\n")
            if newlines:
                line += newlines
                start = match.start() + match.group().rfind("\n") + 1
            pos = match.end()
        self.tokens.append(("eof", "", line, pos - start + 1))
        self.at = 0

    @staticmethod
    def _error(line: int, column: int, what: str) -> RulesError:
        return RulesError(f"Failed to parse ACL rules: At {line}:{column}: {what}")

    def _peek(self, skip_newlines: bool = True) -> tuple[str, str, int, int]:
        while skip_newlines and self.tokens[self.at][0] == "nl":
            self.at += 1
        return self.tokens[self.at]

    def _take(self, kind: str, text: str | None = None) -> str:
        token = self._peek()
        if token[0] != kind or (text is not None and token[1] != text):
            want = repr(text) if text is not None else {"ident": "a name"}.get(kind, kind)
            got = repr(token[1]) if token[0] != "eof" else "end of input"
            raise self._error(token[2], token[3], f"expected {want}, got {got}")
        self.at += 1
        return token[1]

    @staticmethod
    def _unquote(raw: str) -> str:
        return str(json.loads(raw))

    def _key(self) -> str:
        token = self._peek()
        if token[0] == "string":
            self.at += 1
            return self._unquote(token[1])
        return self._take("ident")

    def parse(self) -> list[Item]:
        items: list[Item] = []
        while self._peek()[0] != "eof":
            name = self._key()
            if self._peek()[0] == "punct" and self._peek()[1] == "=":
                self.at += 1
                items.append((name, None, self._string()))
            else:
                label = self._unquote(self._take("string"))
                items.append((name, label, self._block()))
            if self._peek()[0] == "punct" and self._peek()[1] == ",":
                self.at += 1
        return items

    def _string(self) -> str:
        token = self._peek()
        if token[0] != "string":
            raise self._error(token[2], token[3], f"expected a quoted string, got {token[1]!r}")
        self.at += 1
        return self._unquote(token[1])

    def _block(self) -> dict[str, Any]:
        self._take("punct", "{")
        body: dict[str, Any] = {}
        while not (self._peek()[0] == "punct" and self._peek()[1] == "}"):
            key = self._key()
            if self._peek()[0] == "punct" and self._peek()[1] == "{":
                self._block()  # a nested block (Sentinel): not supported, refused below
                body[key] = {}
                continue
            self._take("punct", "=")
            body[key] = self._string()
            if self._peek(skip_newlines=False)[0] == "punct" and self._peek()[1] == ",":
                self.at += 1
        self._take("punct", "}")
        return body


# --- validation (Consul's policy.go rules and texts) ----------------------------------------------

def _go_rule(resource: str, label: str, body: Mapping[str, Any]) -> str:
    type_name, key_field = _GO_RULE[resource]
    parts = [f"{key_field}:{json.dumps(label)}", f"Policy:{json.dumps(body.get('policy', ''))}"]
    if resource in ("key", "service", "node"):
        parts.append('Sentinel:acl.Sentinel{Code:"", EnforcementLevel:""}')
    if resource == "service":
        parts.append(f"Intentions:{json.dumps(body.get('intentions', ''))}")
    if resource in ("key", "service", "node"):
        parts.append("EnterpriseRule:acl.EnterpriseRule{}")
    return f"acl.{type_name}{{{', '.join(parts)}}}"


def _field(body: Mapping[str, Any], name: str) -> Any:
    """HCL matches field names case-insensitively."""
    for key, value in body.items():
        if key.lower() == name:
            return value
    return ""


def _validate(items: Iterable[Item]) -> PolicyRules:
    merged: dict[tuple[str, str, bool], Rule] = {}
    globals_: dict[str, str] = {}
    for name, label, body in items:
        if name in GLOBAL:
            assert isinstance(body, str)
            if body not in (DENY, READ, WRITE):
                raise RulesError(f"Invalid {name} policy: {json.dumps(body)}")
            globals_[name] = strongest(globals_.get(name), body)
            continue
        if name not in SEGMENTED or label is None or not isinstance(body, dict):
            continue  # unknown names are ignored, as HCL's decoder does
        resource, prefix = SEGMENTED[name]
        if any(isinstance(v, dict) for v in body.values()):
            raise RulesError(f"Invalid {name} policy: Sentinel code is not supported by the "
                             "embedded registry")
        policy, intentions = _field(body, "policy"), _field(body, "intentions")
        if not isinstance(policy, str) or not isinstance(intentions, str):
            raise RulesError(f"Failed to parse ACL rules: {name} {json.dumps(label)}: "
                             "policy must be a string")
        normalised = {"policy": policy, "intentions": intentions}
        valid = (DENY, READ, WRITE, LIST) if resource == "key" else (DENY, READ, WRITE)
        if policy not in valid:
            raise RulesError(f"Invalid {name} policy: {_go_rule(resource, label, normalised)}")
        if resource == "service" and intentions and intentions not in (DENY, READ, WRITE):
            raise RulesError(f"Invalid {name} intentions policy: "
                             f"{_go_rule(resource, label, normalised)}")
        rule = Rule(resource, label, prefix, policy,
                    intentions if resource == "service" else "")
        merged[(resource, label, prefix)] = merge_rule(merged.get((resource, label, prefix)),
                                                       rule)
    return PolicyRules(tuple(merged.values()), globals_)


def strongest(a: str | None, b: str) -> str:
    """The access that wins when two rules name the same thing (deny, write, list, read)."""
    if a is None:
        return b
    return a if PRECEDENCE[a] >= PRECEDENCE[b] else b


def merge_rule(old: Rule | None, new: Rule) -> Rule:
    if old is None:
        return new
    intentions = new.intentions if not old.intentions else (
        strongest(old.intentions, new.intentions) if new.intentions else old.intentions)
    return Rule(new.resource, new.segment, new.prefix, strongest(old.policy, new.policy),
                intentions)
