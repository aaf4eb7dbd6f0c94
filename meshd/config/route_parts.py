"""The nested tables of ``routes.toml`` (see ``meshd.config.routes``): a route's ``match``, a
destination's ``policy`` and its ``authorization``, parsed with the file's ``Reader`` and turned
back into canonical data; and the number getters both files use. Pure."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

from meshd.config.reader import Reader
from meshd.config.schema import (
    ANY_SOURCE,
    Authorization,
    AuthorizationRule,
    AuthzAction,
    DestinationPolicy,
    FieldMatch,
    HashOn,
    LoadBalancer,
    MatchKind,
    OutlierDetection,
    RetryBudget,
    RouteMatch,
    StringMatch,
)
from meshd.names import NAME_RULE, is_valid_name
from meshd.patterns import PatternError, compile_pattern

MATCH_KEYS = {"path", "method", "headers", "query"}
POLICY_KEYS = {"load_balancer", "ring_hash", "connect_timeout", "max_connections",
               "max_pending_requests", "outlier_detection", "retry_budget",
               "max_request_bytes", "idle_timeout", "locality"}
OUTLIER_KEYS = {"consecutive_5xx", "consecutive_connect_failures", "interval",
                "base_ejection_time", "max_ejection_time", "max_ejection_percent"}
BUDGET_KEYS = {"ratio", "min_retries_per_second"}
AUTHORIZATION_KEYS = {"rules"}
RULE_KEYS = {"name", "action", "from", "paths", "methods"}

_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token (header names)
_METHOD_RE = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}$")


# -- getters ------------------------------------------------------------------------------------

def get_table(r: Reader, raw: Mapping[str, Any], key: str, path: str,
              allowed: Collection[str]) -> tuple[Mapping[str, Any], str] | None:
    """The table at ``path.key`` and its key path, its unknown keys reported; None when absent
    (or not a table: reported)."""
    if key not in raw:
        return None
    value: Mapping[str, Any] | None = r.get(raw, key, path, dict)
    if value is None:
        return None
    where = f"{path}.{key}"
    r.unknown_keys(value, where, set(allowed))
    return value, where


def get_number(r: Reader, raw: Mapping[str, Any], key: str, path: str, lo: float, hi: float,
               default: float | None) -> float | None:
    """A number in ``[lo, hi]`` (as a float)."""
    value = r.get(raw, key, path, (int, float), default)
    if value is None or value is default:
        return value
    if not lo <= value <= hi:
        r.problem(f"{path}.{key}", f"{value} out of range ({lo:g}-{hi:g})")
        return None
    return float(value)


def get_integer(r: Reader, raw: Mapping[str, Any], key: str, path: str, lo: int,
                hi: int | None, default: int | None) -> int | None:
    """An integer in ``[lo, hi]`` (no upper bound when ``hi`` is None)."""
    value = r.get(raw, key, path, int, default)
    if value is None or value is default:
        return value
    if value < lo or (hi is not None and value > hi):
        bounds = f"{lo}-{hi}" if hi is not None else f"at least {lo}"
        r.problem(f"{path}.{key}", f"{value} out of range ({bounds})")
        return None
    return int(value)


# -- match --------------------------------------------------------------------------------------

def parse_match(r: Reader, raw: Mapping[str, Any], path: str) -> RouteMatch:
    r.unknown_keys(raw, path, MATCH_KEYS)
    path_match = None
    if "path" in raw:
        ppath = f"{path}.path"
        value = raw["path"]
        if not isinstance(value, dict):
            r.problem(ppath, 'expected a table like { prefix = "/api/" } '
                      "(exact, prefix or regex)")
        else:
            path_match = _string_match(r, value, ppath, allow_presence=False)
            if (path_match is not None and path_match.kind is not MatchKind.REGEX
                    and not path_match.value.startswith("/")):
                r.problem(f"{ppath}.{path_match.kind.value}", "a path starts with '/'")
    methods: list[str] = []
    if "method" in raw:
        mpath = f"{path}.method"
        value = raw["method"]
        listed = [value] if isinstance(value, str) else value
        if not isinstance(listed, list) or not listed:
            r.problem(mpath, 'expected a method or a list of them, like ["GET", "HEAD"]')
        else:
            for method in listed:
                if not isinstance(method, str) or not _METHOD_RE.match(method):
                    r.problem(mpath, f"invalid method {method!r} (upper case, like GET)")
                elif method not in methods:
                    methods.append(method)
    headers = _fields(r, raw, "headers", path, lower=True)
    query = _fields(r, raw, "query", path, lower=False)
    return RouteMatch(path_match, tuple(methods), headers, query)


def _fields(r: Reader, raw: Mapping[str, Any], key: str, path: str,
            lower: bool) -> tuple[FieldMatch, ...]:
    table = r.get(raw, key, path, dict, {}) or {}
    out: list[FieldMatch] = []
    seen: set[str] = set()
    for name, spec in table.items():
        fpath = f"{path}.{key}.{name}"
        if lower and not _TOKEN_RE.match(name):
            r.problem(fpath, f"invalid header name {name!r}")
            continue
        if not name:
            r.problem(fpath, "empty name")
            continue
        field_name = name.lower() if lower else name
        if field_name in seen:
            r.problem(fpath, f"{field_name!r} appears twice")
            continue
        seen.add(field_name)
        if isinstance(spec, str):
            out.append(FieldMatch(field_name, StringMatch(MatchKind.EXACT, spec)))
            continue
        if not isinstance(spec, dict):
            r.problem(fpath, 'expected a value or a table like { prefix = "x" } '
                      "(exact, prefix, regex, present, absent)")
            continue
        match = _string_match(r, spec, fpath, allow_presence=True)
        if match is not None:
            out.append(FieldMatch(field_name, match))
    return tuple(out)


def _string_match(r: Reader, raw: Mapping[str, Any], path: str,
                  allow_presence: bool) -> StringMatch | None:
    kinds = [MatchKind.EXACT, MatchKind.PREFIX, MatchKind.REGEX]
    if allow_presence:
        kinds += [MatchKind.PRESENT, MatchKind.ABSENT]
    names = [k.value for k in kinds]
    r.unknown_keys(raw, path, set(names))
    given = [k for k in kinds if k.value in raw]
    if len(given) != 1:
        r.problem(path, f"expected exactly one of {', '.join(names)}")
        return None
    (kind,) = given
    value = raw[kind.value]
    where = f"{path}.{kind.value}"
    if kind in (MatchKind.PRESENT, MatchKind.ABSENT):
        if value is not True:
            r.problem(where, f"expected true (write {kind.value} = true)")
            return None
        return StringMatch(kind)
    if not isinstance(value, str):
        r.problem(where, f"expected a string, got {type(value).__name__}")
        return None
    if kind is MatchKind.REGEX:
        try:
            pattern = compile_pattern(value)
        except PatternError as exc:
            r.problem(where, f"invalid regular expression (RE2 syntax): {exc}")
            return None
        return StringMatch(kind, value, pattern)
    return StringMatch(kind, value)


# -- policy -------------------------------------------------------------------------------------

def parse_policy(r: Reader, raw: Mapping[str, Any], path: str) -> DestinationPolicy | None:
    found = get_table(r, raw, "policy", path, POLICY_KEYS)
    if found is None:
        return None
    table, ppath = found
    allowed = [b.value for b in LoadBalancer]
    balancer = r.choice(table, "load_balancer", ppath, LoadBalancer, allowed,
                        LoadBalancer.ROUND_ROBIN)
    hash_on = _hash_on(r, table, ppath)
    if balancer is LoadBalancer.RING_HASH and hash_on is None and "ring_hash" not in table:
        r.problem(f"{ppath}.ring_hash", 'ring_hash needs { header = "NAME" } or '
                  "{ source = true }")
    if balancer is not LoadBalancer.RING_HASH and "ring_hash" in table:
        r.problem(f"{ppath}.ring_hash", 'only used with load_balancer = "ring_hash"')
    connect_timeout = r.duration(table, "connect_timeout", ppath, None)
    max_connections = get_integer(r, table, "max_connections", ppath, 1, None, None)
    max_pending = get_integer(r, table, "max_pending_requests", ppath, 0, None, None)
    if max_pending is not None and max_connections is None and "max_connections" not in table:
        r.problem(f"{ppath}.max_pending_requests",
                  "needs max_connections (requests only wait when every connection is busy)")
    outlier = _outlier(r, table, ppath)
    budget = _budget(r, table, ppath)
    max_request_bytes = get_integer(r, table, "max_request_bytes", ppath, 0, None, None)
    idle_timeout = r.duration(table, "idle_timeout", ppath, None)
    locality = _locality(r, table, ppath)
    return DestinationPolicy(balancer or LoadBalancer.ROUND_ROBIN, hash_on, connect_timeout,
                             max_connections, max_pending, outlier, budget, max_request_bytes,
                             idle_timeout, locality)


def _locality(r: Reader, raw: Mapping[str, Any], path: str) -> tuple[str, ...]:
    """``locality = ["region", "zone"]``: host label names, most significant first."""
    if "locality" not in raw:
        return ()
    listed = r.get(raw, "locality", path, list)
    if listed is None:
        return ()
    lpath = f"{path}.locality"
    if not listed:
        r.problem(lpath, "empty: leave it out for no locality preference")
    out: list[str] = []
    for item in listed:
        if not isinstance(item, str) or not is_valid_name(item):
            r.problem(lpath, f"invalid label name {item!r} (a host label such as \"zone\": "
                      f"{NAME_RULE})")
        elif item in out:
            r.problem(lpath, f"label {item!r} listed twice")
        else:
            out.append(item)
    return tuple(out)


def _hash_on(r: Reader, raw: Mapping[str, Any], path: str) -> HashOn | None:
    found = get_table(r, raw, "ring_hash", path, {"header", "source"})
    if found is None:
        return None
    table, hpath = found
    header = r.get(table, "header", hpath, str, None)
    source = r.get(table, "source", hpath, bool, False)
    if header is not None and not _TOKEN_RE.match(header):
        r.problem(f"{hpath}.header", f"invalid header name {header!r}")
        return None
    if (header is None) == (not source):
        r.problem(hpath, 'expected exactly one of header = "NAME" or source = true')
        return None
    return HashOn(header.lower() if header else None, bool(source))


def _outlier(r: Reader, raw: Mapping[str, Any], path: str) -> OutlierDetection | None:
    found = get_table(r, raw, "outlier_detection", path, OUTLIER_KEYS)
    if found is None:
        return None
    table, opath = found
    d = OutlierDetection()
    five = get_integer(r, table, "consecutive_5xx", opath, 0, None, d.consecutive_5xx)
    connect = get_integer(r, table, "consecutive_connect_failures", opath, 0, None,
                       d.consecutive_connect_failures)
    interval = r.duration(table, "interval", opath, d.interval)
    base = r.duration(table, "base_ejection_time", opath, d.base_ejection_time)
    cap = r.duration(table, "max_ejection_time", opath, max(d.max_ejection_time, base or 0))
    percent = get_integer(r, table, "max_ejection_percent", opath, 0, 100, d.max_ejection_percent)
    if five == 0 and connect == 0:
        r.problem(opath, "consecutive_5xx and consecutive_connect_failures are both 0: "
                  "nothing would ever be ejected")
    if base is not None and cap is not None and cap < base:
        r.problem(f"{opath}.max_ejection_time", "shorter than base_ejection_time")
        return None
    if (five is None or connect is None or interval is None or base is None or cap is None
            or percent is None):
        return None
    return OutlierDetection(five, connect, interval, base, cap, percent)


def _budget(r: Reader, raw: Mapping[str, Any], path: str) -> RetryBudget | None:
    found = get_table(r, raw, "retry_budget", path, BUDGET_KEYS)
    if found is None:
        return None
    table, bpath = found
    d = RetryBudget()
    ratio = get_number(r, table, "ratio", bpath, 0, 10, d.ratio)
    minimum = get_number(r, table, "min_retries_per_second", bpath, 0, 1e6,
                      d.min_retries_per_second)
    if ratio is None or minimum is None:
        return None
    return RetryBudget(ratio, minimum)


# -- authorization ------------------------------------------------------------------------------

def parse_authorization(r: Reader, raw: Mapping[str, Any], path: str) -> Authorization | None:
    """``[destinations.X.authorization]``: ``rules``, an ordered list of tables."""
    found = get_table(r, raw, "authorization", path, AUTHORIZATION_KEYS)
    if found is None:
        return None
    table, apath = found
    listed = r.get(table, "rules", apath, list)
    if listed is None:
        return None
    if not listed:
        r.problem(f"{apath}.rules", "empty: write rules, or leave authorization out for the "
                  "mesh's default_policy")
        return None
    rules: list[AuthorizationRule] = []
    names: set[str] = set()
    before = len(r.problems)
    for i, rule_raw in enumerate(listed):
        rpath = f"{apath}.rules[{i}]"
        if not isinstance(rule_raw, dict):
            r.problem(rpath, 'expected a table like { name = "web", action = "allow", '
                      'from = ["web"] }')
            continue
        rule = _authorization_rule(r, rule_raw, rpath, i)
        if rule is None:
            continue
        if rule.name in names:
            r.problem(f"{rpath}.name", f"rule name {rule.name!r} used twice")
            continue
        names.add(rule.name)
        rules.append(rule)
    if len(r.problems) != before:
        return None
    return Authorization(tuple(rules))


def _authorization_rule(r: Reader, raw: Mapping[str, Any], path: str,
                        index: int) -> AuthorizationRule | None:
    before = len(r.problems)
    r.unknown_keys(raw, path, RULE_KEYS)
    name = r.name(raw, "name", path, None) or _generated_rule_name(index)
    allowed = [a.value for a in AuthzAction]
    action = r.choice(raw, "action", path, AuthzAction, allowed)
    sources = _strings(r, raw, "from", path, _source_problem)
    paths = _strings(r, raw, "paths", path, _path_problem)
    methods = _strings(r, raw, "methods", path, _method_problem)
    if len(r.problems) != before or action is None:
        return None
    return AuthorizationRule(name, action, sources, paths, methods)


def _generated_rule_name(index: int) -> str:
    return f"rules[{index}]"  # not a valid explicit name: never clashes with one


def _strings(r: Reader, raw: Mapping[str, Any], key: str, path: str,
             problem: Callable[[str], str | None]) -> tuple[str, ...]:
    """A non-empty list of strings, each checked by ``problem`` (a reason, or None)."""
    if key not in raw:
        return ()
    listed = r.get(raw, key, path, list)
    if listed is None:
        return ()
    if not listed:
        r.problem(f"{path}.{key}", "empty: leave it out to put no condition on it")
        return ()
    out: list[str] = []
    for item in listed:
        reason = problem(item) if isinstance(item, str) else f"expected a string, got {item!r}"
        if reason is not None:
            r.problem(f"{path}.{key}", reason)
        elif item not in out:
            out.append(item)
    return tuple(out)


def _source_problem(value: str) -> str | None:
    if value == ANY_SOURCE or is_valid_name(value):
        return None
    return f"invalid service name {value!r} (or \"*\" for any mesh service)"


def _path_problem(value: str) -> str | None:
    if value == "*":
        return None
    if not value.startswith("/"):
        return f"{value!r}: a path starts with '/' (or is \"*\")"
    if "*" in value[:-1]:
        return f"{value!r}: '*' only at the end (a prefix)"
    return None


def _method_problem(value: str) -> str | None:
    if _METHOD_RE.match(value):
        return None
    return f"invalid method {value!r} (upper case, like GET)"


def authorization_data(authorization: Authorization) -> dict[str, Any]:
    rules: list[dict[str, Any]] = []
    for i, rule in enumerate(authorization.rules):
        entry: dict[str, Any] = {}
        if rule.name != _generated_rule_name(i):
            entry["name"] = rule.name
        entry["action"] = rule.action.value
        if rule.sources:
            entry["from"] = list(rule.sources)
        if rule.paths:
            entry["paths"] = list(rule.paths)
        if rule.methods:
            entry["methods"] = list(rule.methods)
        rules.append(entry)
    return {"rules": rules}


# -- back to data -------------------------------------------------------------------------------

def _string_match_data(match: StringMatch) -> dict[str, Any]:
    if match.kind in (MatchKind.PRESENT, MatchKind.ABSENT):
        return {match.kind.value: True}
    return {match.kind.value: match.value}


def match_data(match: RouteMatch) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if match.path is not None:
        out["path"] = _string_match_data(match.path)
    if match.methods:
        out["method"] = list(match.methods)
    if match.headers:
        out["headers"] = {f.name: _string_match_data(f.match) for f in match.headers}
    if match.query:
        out["query"] = {f.name: _string_match_data(f.match) for f in match.query}
    return out


def policy_data(policy: DestinationPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if policy.load_balancer is not LoadBalancer.ROUND_ROBIN:
        out["load_balancer"] = policy.load_balancer.value
    if policy.hash_on is not None:
        out["ring_hash"] = ({"header": policy.hash_on.header} if policy.hash_on.header
                            else {"source": True})
    if policy.connect_timeout is not None:
        out["connect_timeout"] = policy.connect_timeout
    if policy.max_connections is not None:
        out["max_connections"] = policy.max_connections
    if policy.max_pending_requests is not None:
        out["max_pending_requests"] = policy.max_pending_requests
    o = policy.outlier_detection
    if o is not None:
        out["outlier_detection"] = {
            "consecutive_5xx": o.consecutive_5xx,
            "consecutive_connect_failures": o.consecutive_connect_failures,
            "interval": o.interval, "base_ejection_time": o.base_ejection_time,
            "max_ejection_time": o.max_ejection_time,
            "max_ejection_percent": o.max_ejection_percent,
        }
    b = policy.retry_budget
    if b is not None:
        out["retry_budget"] = {"ratio": b.ratio, "min_retries_per_second": b.min_retries_per_second}
    if policy.max_request_bytes is not None:
        out["max_request_bytes"] = policy.max_request_bytes
    if policy.idle_timeout is not None:
        out["idle_timeout"] = policy.idle_timeout
    if policy.locality:
        out["locality"] = list(policy.locality)
    return out
