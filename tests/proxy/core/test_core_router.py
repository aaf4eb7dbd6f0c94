"""Subset choice and endpoint picking: pure, replayable draws."""

from __future__ import annotations

import random
from types import MappingProxyType

from meshd.config.schema import (
    DestinationRoutes,
    MatchKind,
    Route,
    RouteMatch,
    RouteTable,
    SplitLeg,
    StringMatch,
    Subset,
)
from meshd.proxy.core.balancer import RoundRobin
from meshd.proxy.core.matcher import RequestFacts
from meshd.proxy.core.router import candidates, choose_subset, no_endpoint_reason, plan
from meshd.proxy.core.view import MeshView
from meshd.registry.model import Endpoint, EndpointSet


def _dest(*legs: tuple[str, int], timeout: float | None = None) -> DestinationRoutes:
    return DestinationRoutes(
        "payments", subsets=(Subset("v1", "v1"), Subset("v2", "v2"), Subset("v3", "v3")),
        split=tuple(SplitLeg(name, weight) for name, weight in legs), timeout=timeout)


def _ep(node: str, version: str, healthy: bool = True) -> Endpoint:
    return Endpoint("payments", f"payments-{version}", node, f"10.0.0.{ord(node[0]) % 250}",
                    15001, version, healthy)


def _view(dest: DestinationRoutes | None, *endpoints: Endpoint) -> MeshView:
    return MeshView(
        routes=RouteTable((dest,) if dest else ()),
        endpoints=MappingProxyType({"payments": EndpointSet("payments", endpoints, 7, 0.0)}))


def test_ninety_ten_over_ten_thousand_draws() -> None:
    rng = random.Random(20240601)
    dest = _dest(("v1", 90), ("v2", 10))
    v1 = sum(choose_subset(dest.split, rng.random()) == "v1" for _ in range(10_000))
    # binomial(10000, 0.9): mean 9000, sd 30; 5 sd either side
    assert 8850 <= v1 <= 9150


def test_split_maps_the_unit_interval_exactly() -> None:
    dest = _dest(("v1", 90), ("v2", 10))
    draws = [choose_subset(dest.split, i / 10_000) for i in range(10_000)]
    assert draws.count("v1") == 9000
    assert draws.count("v2") == 1000
    assert choose_subset(dest.split, 0.8999) == "v1"
    assert choose_subset(dest.split, 0.9) == "v2"


def test_zero_weight_leg_never_chosen() -> None:
    for legs, expected in (((("v1", 100), ("v2", 0)), "v1"), ((("v1", 0), ("v2", 100)), "v2")):
        dest = _dest(*legs)
        for rand in (0.0, 0.5, 0.999999, 1.0):
            assert choose_subset(dest.split, rand) == expected
    three = _dest(("v1", 50), ("v2", 0), ("v3", 50))
    assert {choose_subset(three.split, i / 100) for i in range(100)} == {"v1", "v3"}


def test_no_split_means_any_instance() -> None:
    assert choose_subset(None, 0.3) is None
    assert choose_subset(DestinationRoutes("payments").split, 0.3) is None
    view = _view(None, _ep("a", "v1"), _ep("b", "v2"), _ep("c", "v2", healthy=False))
    assert candidates(view, "payments", None) == (_ep("a", "v1"), _ep("b", "v2"))


def test_candidates_by_subset_version_and_health() -> None:
    dest = _dest(("v1", 50), ("v2", 50))
    view = _view(dest, _ep("a", "v1"), _ep("b", "v2"), _ep("c", "v2", healthy=False))
    assert candidates(view, "payments", "v2") == (_ep("b", "v2"),)
    assert candidates(view, "payments", "v9") == ()  # not declared: nothing, not everything
    assert candidates(view, "orders", None) == ()


def test_round_robin_cycles_per_key_and_survives_shrinking_lists() -> None:
    rr = RoundRobin()
    eps = (_ep("a", "v1"), _ep("b", "v1"), _ep("c", "v1"))
    assert [rr.pick("k", eps) for _ in range(6)] == [*eps, *eps]
    assert rr.pick("other", eps) == eps[0]  # separate cursor
    assert rr.pick("k", eps[:1]) == eps[0]
    assert rr.pick("k", ()) is None


def test_plan_and_reasons() -> None:
    dest = _dest(("v1", 100), ("v2", 0), timeout=2.5)
    view = _view(dest, _ep("a", "v1"), _ep("b", "v2"))
    routed = plan(view, "payments", None, 0.42)
    assert routed.candidates == (_ep("a", "v1"),)
    assert (routed.subset, routed.timeout, routed.route_name) == ("v1", 2.5, "default")

    unhealthy = _view(dest, _ep("a", "v1", healthy=False), _ep("b", "v2"))
    routed = plan(unhealthy, "payments", None, 0.42)
    assert routed.candidates == ()
    assert no_endpoint_reason(unhealthy, "payments", routed.subset) == \
        "no healthy endpoint of payments in subset v1"

    assert no_endpoint_reason(_view(None), "payments", None) == \
        "no healthy endpoint of payments"
    routed = plan(MeshView(), "payments", None, 0.1)
    assert (routed.route, routed.subset, routed.timeout) == (None, None, None)
    assert no_endpoint_reason(MeshView(), "payments", None) == "no endpoints known for payments"


def test_plan_takes_the_first_matching_route_and_its_split() -> None:
    canary = Route("canary", RouteMatch(path=StringMatch(MatchKind.PREFIX, "/beta")),
                   split=(SplitLeg("v2", 100),))
    dest = DestinationRoutes(
        "payments", subsets=(Subset("v1", "v1"), Subset("v2", "v2")),
        split=(SplitLeg("v1", 100),), timeout=3.0, routes=(canary,))
    view = _view(dest, _ep("a", "v1"), _ep("b", "v2"))
    beta = plan(view, "payments", RequestFacts("GET", "/beta/x"), 0.0)
    assert (beta.route_name, beta.subset, beta.candidates) == ("canary", "v2", (_ep("b", "v2"),))
    assert beta.timeout == 3.0  # inherited from the destination level
    other = plan(view, "payments", RequestFacts("GET", "/pay"), 0.0)
    assert (other.route_name, other.subset) == ("default", "v1")
    # TCP (no request facts) always takes the default route
    assert plan(view, "payments", None, 0.0).route_name == "default"
