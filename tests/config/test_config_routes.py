"""routes.toml with routes and policies: every defect names its key path and reason, the first
format still means what it meant, and the canonical form round-trips (hypothesis)."""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.config.routes import parse_routes, routes_to_data
from meshd.config.schema import (
    GRPC_RETRY_CONDITIONS,
    RETRY_CONDITIONS,
    DestinationPolicy,
    DestinationRoutes,
    FaultPolicy,
    FieldMatch,
    HashOn,
    LoadBalancer,
    MatchKind,
    MirrorPolicy,
    OutlierDetection,
    RetryBudget,
    RetryPolicy,
    Route,
    RouteMatch,
    RouteTable,
    SplitLeg,
    StringMatch,
    Subset,
)
from meshd.errors import ConfigError

FULL = """
[destinations.payments]
subsets = { v1 = { version = "v1" }, v2 = { version = "v2" } }
split = { v1 = 90, v2 = 10 }
timeout = "3s"
retries = { attempts = 2, per_try_timeout = "500ms", retry_on = ["connect-failure", 503] }

[[destinations.payments.routes]]
name = "canary-users"
match = { headers = { "X-Canary" = "1" }, path = { prefix = "/api/" }, method = "GET" }
split = { v2 = 100 }

[[destinations.payments.routes]]
match = { query = { debug = { present = true } } }
fault = { delay = "100ms", delay_percent = 5, abort_status = 503, abort_percent = 1 }
mirror = { subset = "v2", percent = 10 }

[destinations.payments.policy]
load_balancer = "ring_hash"
ring_hash = { header = "X-User" }
max_connections = 100
max_pending_requests = 10
connect_timeout = "2s"
idle_timeout = "90s"
outlier_detection = { consecutive_5xx = 3, base_ejection_time = "10s", max_ejection_percent = 50 }
retry_budget = { ratio = 0.1, min_retries_per_second = 5 }
"""


def test_full_file_parses_into_the_tree() -> None:
    table = parse_routes(tomllib.loads(FULL))
    dest = table.get("payments")
    assert dest is not None
    assert dest.retries == RetryPolicy(2, 0.5, ("connect-failure", "503"))
    canary, second = dest.routes
    assert canary.name == "canary-users"
    assert canary.match.methods == ("GET",)
    assert canary.match.headers == (FieldMatch("x-canary", StringMatch(MatchKind.EXACT, "1")),)
    assert canary.split == (SplitLeg("v2", 100),) and canary.timeout is None
    assert second.name == "routes[1]"
    assert second.fault == FaultPolicy(0.1, 5.0, 503, 1.0)
    assert second.mirror == MirrorPolicy("v2", 10.0)
    p = dest.policy
    assert (p.load_balancer, p.hash_on) == (LoadBalancer.RING_HASH, HashOn("x-user"))
    assert (p.max_connections, p.max_pending_requests, p.connect_timeout) == (100, 10, 2.0)
    assert p.idle_timeout == 90.0
    assert p.outlier_detection == OutlierDetection(3, 5, 10.0, 10.0, 300.0, 50)
    assert p.retry_budget == RetryBudget(0.1, 5.0)
    assert parse_routes(routes_to_data(table)) == table
    assert parse_routes(json.loads(json.dumps(routes_to_data(table)))) == table


def test_first_format_still_parses_to_the_same_table() -> None:
    old = {"destinations": {"payments": {"subsets": {"v1": {"version": "v1"}},
                                         "split": {"v1": 100}, "timeout": 2}}}
    assert parse_routes(old) == RouteTable((DestinationRoutes(
        "payments", (Subset("v1", "v1"),), (SplitLeg("v1", 100),), 2.0),))
    assert routes_to_data(parse_routes(old)) == old


def test_retry_on_takes_grpc_status_names_beside_the_http_conditions() -> None:
    data = {"destinations": {"greeter": {
        "subsets": {"v1": {"version": "v1"}}, "split": {"v1": 100},
        "retries": {"attempts": 2, "retry_on": ["unavailable", "resource-exhausted", "reset",
                                                "deadline-exceeded", "503"]}}}}
    dest = parse_routes(data).get("greeter")
    assert dest is not None
    assert dest.retries == RetryPolicy(2, None, ("unavailable", "resource-exhausted", "reset",
                                                 "deadline-exceeded", "503"))
    for name in GRPC_RETRY_CONDITIONS:
        one = copy.deepcopy(data)
        one["destinations"]["greeter"]["retries"]["retry_on"] = [name]
        assert parse_routes(one).get("greeter") is not None


def test_shop_example_keeps_its_canary_split() -> None:
    path = Path(__file__).parents[2] / "examples" / "shop" / "routes.toml"
    table = parse_routes(tomllib.loads(path.read_text()), str(path))
    dest = table.get("payments")
    assert dest is not None
    assert [(leg.subset, leg.weight) for leg in dest.split] == [("v1", 90), ("v2", 10)]


BASE: dict[str, Any] = tomllib.loads(FULL)
P = "destinations.payments"
R0 = f"{P}.routes[0]"


def _with(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    node: Any = data
    keys = path.replace("[", ".[").split(".")
    for key in keys[:-1]:
        node = node[int(key[1:-1])] if key.startswith("[") else node.setdefault(key, {})
    last = keys[-1]
    if last.startswith("["):
        node[int(last[1:-1])] = value
    else:
        node[last] = value
    return data


CASES = [
    (f"{R0}.match.path", {"regex": "(unclosed"}, f"{R0}.match.path.regex",
     "invalid regular expression (RE2 syntax): missing ): (unclosed"),
    (f"{R0}.match.path", {"regex": "/(a)\\1"}, f"{R0}.match.path.regex",
     "invalid regular expression (RE2 syntax): invalid escape sequence: \\1"),
    (f"{R0}.match.path", {"regex": "/(?=admin)"}, f"{R0}.match.path.regex",
     "invalid regular expression (RE2 syntax): invalid perl operator: (?="),
    (f"{R0}.match.path", {"prefix": "api"}, f"{R0}.match.path.prefix", "a path starts with '/'"),
    (f"{R0}.match.path", "/api", f"{R0}.match.path",
     'expected a table like { prefix = "/api/" } (exact, prefix or regex)'),
    (f"{R0}.match.path", {"prefix": "/a", "exact": "/a"}, f"{R0}.match.path",
     "expected exactly one of exact, prefix, regex"),
    (f"{R0}.match.method", "get", f"{R0}.match.method",
     "invalid method 'get' (upper case, like GET)"),
    (f"{R0}.match.headers", {"x a": "1"}, f"{R0}.match.headers.x a",
     "invalid header name 'x a'"),
    (f"{R0}.match.headers", {"x-a": {"present": False}}, f"{R0}.match.headers.x-a.present",
     "expected true (write present = true)"),
    (f"{R0}.match.headers", {"x-a": {"regex": "["}}, f"{R0}.match.headers.x-a.regex",
     "invalid regular expression (RE2 syntax): missing ]: ["),
    (f"{R0}.match.query", {"q": {"suffix": "x"}}, f"{R0}.match.query.q.suffix",
     "unknown key (expected one of: absent, exact, prefix, present, regex)"),
    (f"{R0}.match.host", "x", f"{R0}.match.host",
     "unknown key (expected one of: headers, method, path, query)"),
    (f"{R0}.name", "default", f"{R0}.name", "'default' names the destination-level route"),
    (f"{P}.routes[1].name", "canary-users", f"{P}.routes[1].name",
     "route name 'canary-users' used twice"),
    (f"{R0}.split", {"v2": 50}, f"{R0}.split", "weights sum to 50, must sum to 100"),
    (f"{R0}.split", {"v3": 100}, f"{R0}.split.v3", "unknown subset 'v3' (declared: v1, v2)"),
    (f"{R0}.retries", {"attempts": 11}, f"{R0}.retries.attempts", "11 out of range (0-10)"),
    (f"{R0}.retries", {"per_try_timeout": "1s"}, f"{R0}.retries.attempts",
     "required key is missing"),
    (f"{R0}.retries", {"attempts": 1, "retry_on": ["5xx", "sometimes"]}, f"{R0}.retries.retry_on",
     "unknown condition 'sometimes' (expected one of: connect-failure, reset, timeout, 5xx, "
     'gateway-error, a status such as "503", or a gRPC status: cancelled, deadline-exceeded, '
     "internal, resource-exhausted, unavailable)"),
    # gRPC names are kebab-case, as Envoy's retry_on spells them: not the canonical upper case
    (f"{R0}.retries", {"attempts": 1, "retry_on": ["UNAVAILABLE"]}, f"{R0}.retries.retry_on",
     "unknown condition 'UNAVAILABLE' (expected one of: connect-failure, reset, timeout, 5xx, "
     'gateway-error, a status such as "503", or a gRPC status: cancelled, deadline-exceeded, '
     "internal, resource-exhausted, unavailable)"),
    (f"{R0}.retries", {"attempts": 1, "retry_on": []}, f"{R0}.retries.retry_on",
     "empty: nothing would be retried"),
    (f"{R0}.fault", {"delay_percent": 5}, f"{R0}.fault",
     "expected delay or abort_status (or both)"),
    (f"{R0}.fault", {"abort_status": 503, "abort_percent": 101}, f"{R0}.fault.abort_percent",
     "101 out of range (0-100)"),
    (f"{R0}.fault", {"abort_status": 99}, f"{R0}.fault.abort_status", "99 out of range (200-599)"),
    (f"{R0}.mirror", {"subset": "v9"}, f"{R0}.mirror.subset",
     "unknown subset 'v9' (declared: v1, v2)"),
    (f"{P}.routes", {"name": "x"}, f"{P}.routes", "expected an array, got dict"),
    (f"{P}.policy.load_balancer", "fastest", f"{P}.policy.load_balancer",
     "must be one of round_robin, least_request, random, ring_hash, got 'fastest'"),
    (f"{P}.policy.ring_hash", {"header": "x", "source": True}, f"{P}.policy.ring_hash",
     'expected exactly one of header = "NAME" or source = true'),
    (f"{P}.policy.max_connections", 0, f"{P}.policy.max_connections",
     "0 out of range (at least 1)"),
    (f"{P}.policy.outlier_detection", {"consecutive_5xx": 0, "consecutive_connect_failures": 0},
     f"{P}.policy.outlier_detection",
     "consecutive_5xx and consecutive_connect_failures are both 0: nothing would ever be ejected"),
    (f"{P}.policy.outlier_detection", {"base_ejection_time": "1m", "max_ejection_time": "30s"},
     f"{P}.policy.outlier_detection.max_ejection_time", "shorter than base_ejection_time"),
    (f"{P}.policy.retry_budget", {"ratio": -1}, f"{P}.policy.retry_budget.ratio",
     "-1 out of range (0-10)"),
    (f"{P}.policy.idle_timeout", "0s", f"{P}.policy.idle_timeout",
     "duration must be greater than zero"),
    (f"{P}.policy.idle_timeout", "soon", f"{P}.policy.idle_timeout",
     "invalid duration 'soon' (use e.g. 500ms, 10s, 1m30s, 24h)"),
]


@pytest.mark.parametrize(("path", "value", "where", "reason"), CASES)
def test_problem_names_key_path_and_reason(path: str, value: Any, where: str,
                                           reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_routes(_with(path, value), "routes.toml")
    assert f"routes.toml: {where}: {reason}" in [str(p) for p in info.value.problems]


def test_ring_hash_needs_its_key_and_pending_needs_connections() -> None:
    data = _with(f"{P}.policy", {"load_balancer": "ring_hash", "max_pending_requests": 5})
    with pytest.raises(ConfigError) as info:
        parse_routes(data, "routes.toml")
    assert {p.path for p in info.value.problems} == {
        f"{P}.policy.ring_hash", f"{P}.policy.max_pending_requests"}
    other = _with(f"{P}.policy", {"ring_hash": {"source": True}})
    with pytest.raises(ConfigError, match='only used with load_balancer = "ring_hash"'):
        parse_routes(other)


def test_every_defect_is_reported_at_once() -> None:
    data = _with(f"{R0}.match.path", {"regex": "("})
    data["destinations"]["payments"]["policy"]["max_connections"] = -1
    data["destinations"]["payments"]["routes"][1]["mirror"] = {"subset": "nope"}
    with pytest.raises(ConfigError) as info:
        parse_routes(data)
    assert len(info.value.problems) == 3


# -- canonical round trip ----------------------------------------------------------------------

NAMES = st.sampled_from(["v1", "v2", "v3"])
DURATIONS = st.floats(min_value=0.001, max_value=86400, allow_nan=False)
PERCENT = st.floats(min_value=0, max_value=100, allow_nan=False)
TEXT = st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=12)
HEADER = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)


SPLITS = st.sampled_from([
    (), (SplitLeg("v1", 100),), (SplitLeg("v1", 90), SplitLeg("v2", 10)),
    (SplitLeg("v3", 0), SplitLeg("v2", 100)),
])
VALUE_MATCHES = st.one_of(
    st.builds(StringMatch, st.sampled_from([MatchKind.EXACT, MatchKind.PREFIX]),
              TEXT.map(lambda t: "/" + t)),
    st.builds(StringMatch, st.just(MatchKind.REGEX), st.sampled_from(["/a.*", "[0-9]+", "x|y"])))
FIELD_MATCHES = VALUE_MATCHES | st.builds(
    StringMatch, st.sampled_from([MatchKind.PRESENT, MatchKind.ABSENT]))


def _fields(name: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[FieldMatch, ...]]:
    return st.lists(st.builds(FieldMatch, name, FIELD_MATCHES), max_size=3,
                    unique_by=lambda f: f.name).map(tuple)


MATCHES = st.builds(
    RouteMatch, st.none() | VALUE_MATCHES,
    st.lists(st.sampled_from(["GET", "POST", "PUT"]), unique=True, max_size=2).map(tuple),
    _fields(HEADER), _fields(st.from_regex(r"[a-z_]{1,8}", fullmatch=True)))
RETRIES = st.none() | st.builds(
    RetryPolicy, st.integers(0, 10), st.none() | DURATIONS,
    st.lists(st.sampled_from([*RETRY_CONDITIONS, *GRPC_RETRY_CONDITIONS, "503", "429"]),
             unique=True, min_size=1, max_size=4).map(tuple))
FAULTS = st.none() | st.one_of(
    st.builds(FaultPolicy, DURATIONS, PERCENT, st.none(), st.just(0.0)),
    st.builds(FaultPolicy, st.none(), st.just(0.0), st.integers(200, 599), PERCENT),
    st.builds(FaultPolicy, DURATIONS, PERCENT, st.integers(200, 599), PERCENT))
MIRRORS = st.none() | st.builds(MirrorPolicy, NAMES, PERCENT)
ROUTES = st.lists(st.builds(
    Route, st.sampled_from(["a", "b", "c"]), MATCHES, st.none() | SPLITS, st.none() | DURATIONS,
    RETRIES, FAULTS, MIRRORS), max_size=3, unique_by=lambda r: r.name).map(tuple)
OUTLIERS = st.none() | st.builds(
    OutlierDetection, st.integers(1, 20), st.integers(0, 20), DURATIONS, st.just(5.0),
    st.floats(5.0, 1000.0), st.integers(0, 100))
BUDGETS = st.none() | st.builds(RetryBudget, st.floats(0, 10), st.floats(0, 1000))
BALANCING = st.sampled_from([(b, None) for b in LoadBalancer if b is not LoadBalancer.RING_HASH]
                            + [(LoadBalancer.RING_HASH, HashOn("x-user")),
                               (LoadBalancer.RING_HASH, HashOn(None, True))])
LIMITS = st.sampled_from([(None, None), (10, None), (10, 0), (1, 5000)])
LOCALITY = st.sampled_from([(), ("zone",), ("region", "zone")])
POLICIES = st.builds(
    lambda balancing, limits, timeout, outlier, budget, locality: DestinationPolicy(
        balancing[0], balancing[1], timeout, limits[0], limits[1], outlier, budget,
        locality=locality),
    BALANCING, LIMITS, st.none() | DURATIONS, OUTLIERS, BUDGETS, LOCALITY)
SUBSETS = st.sampled_from([
    (Subset("v1", "v1"), Subset("v2", "v2"), Subset("v3", "v3")),
    (Subset("v1", "v1", ("v2",)), Subset("v2", "v2", ("v1",)), Subset("v3", "v3", ("v2", "v1"))),
])


def _named(routes: tuple[Route, ...]) -> tuple[Route, ...]:
    """Some routes keep the name the parser gives an unnamed route (``routes[i]``)."""
    return tuple(dataclasses.replace(r, name=f"routes[{i}]") if r.name == "c" else r
                 for i, r in enumerate(routes))


DESTINATIONS = st.builds(
    DestinationRoutes, st.sampled_from(["payments", "cart", "ledger"]),
    SUBSETS, SPLITS,
    st.none() | DURATIONS, ROUTES.map(_named), RETRIES, FAULTS, MIRRORS, POLICIES)


@settings(max_examples=100, deadline=None)
@given(st.lists(DESTINATIONS, max_size=3, unique_by=lambda d: d.service))
def test_canonical_form_round_trips(dests: list[DestinationRoutes]) -> None:
    table = RouteTable(tuple(sorted(dests, key=lambda d: d.service)))
    data = routes_to_data(table)
    assert parse_routes(data) == table
    assert parse_routes(json.loads(json.dumps(data))) == table  # as stored in the KV


# -- failover and locality ---------------------------------------------------------------------

def _payments(**extra: Any) -> dict[str, Any]:
    return {"destinations": {"payments": {
        "subsets": {"v1": {"version": "v1", "failover": ["v2"]},
                    "v2": {"version": "v2", "failover": ["v1"]}},
        "split": {"v1": 100}, **extra}}}


def test_subsets_fail_over_to_each_other_and_policy_declares_locality() -> None:
    table = parse_routes(_payments(policy={"locality": ["region", "zone"]}))
    dest = table.get("payments")
    assert dest is not None
    assert dest.subsets == (Subset("v1", "v1", ("v2",)), Subset("v2", "v2", ("v1",)))
    assert dest.policy.locality == ("region", "zone")


@pytest.mark.parametrize(("subsets", "policy", "where", "reason"), [
    ({"v1": {"version": "v1", "failover": ["v9"]}}, {}, "subsets.v1.failover",
     "unknown subset 'v9' (declared: v1)"),
    ({"v1": {"version": "v1", "failover": ["v1"]}}, {}, "subsets.v1.failover",
     "subset 'v1' cannot fail over to itself"),
    ({"v1": {"version": "v1", "failover": []}}, {}, "subsets.v1.failover",
     "empty: leave it out for no failover"),
    ({"v1": {"version": "v1", "failover": "v2"}, "v2": {"version": "v2"}}, {},
     "subsets.v1.failover", "expected an array, got str"),
    ({"v1": {"version": "v1", "failover": ["v2", "v2"]}, "v2": {"version": "v2"}}, {},
     "subsets.v1.failover", "subset 'v2' listed twice"),
    ({"v1": {"version": "v1"}}, {"locality": []}, "policy.locality",
     "empty: leave it out for no locality preference"),
    ({"v1": {"version": "v1"}}, {"locality": ["Zone"]}, "policy.locality",
     "invalid label name 'Zone' (a host label such as \"zone\": use lowercase letters, "
     "digits and '-' (max 63))"),
    ({"v1": {"version": "v1"}}, {"locality": ["zone", "zone"]}, "policy.locality",
     "label 'zone' listed twice"),
])
def test_failover_and_locality_problems(subsets: dict[str, Any], policy: dict[str, Any],
                                        where: str, reason: str) -> None:
    data = {"destinations": {"payments": {"subsets": subsets, "policy": policy}}}
    with pytest.raises(ConfigError) as info:
        parse_routes(data, "routes.toml")
    assert f"routes.toml: destinations.payments.{where}: {reason}" in \
        [str(p) for p in info.value.problems]
