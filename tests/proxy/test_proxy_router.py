"""Subset choice and endpoint picking: pure, replayable draws."""

from __future__ import annotations

import random
from types import MappingProxyType

from meshd.config.schema import DestinationRoutes, RouteTable, SplitLeg, Subset
from meshd.proxy.router import RoundRobin, candidates, choose_subset, route
from meshd.proxy.view import MeshView
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
    v1 = sum(choose_subset(dest, rng.random()) == "v1" for _ in range(10_000))
    # binomial(10000, 0.9): mean 9000, sd 30; 5 sd either side
    assert 8850 <= v1 <= 9150


def test_split_maps_the_unit_interval_exactly() -> None:
    dest = _dest(("v1", 90), ("v2", 10))
    draws = [choose_subset(dest, i / 10_000) for i in range(10_000)]
    assert draws.count("v1") == 9000
    assert draws.count("v2") == 1000
    assert choose_subset(dest, 0.8999) == "v1"
    assert choose_subset(dest, 0.9) == "v2"


def test_zero_weight_leg_never_chosen() -> None:
    for legs, expected in (((("v1", 100), ("v2", 0)), "v1"), ((("v1", 0), ("v2", 100)), "v2")):
        dest = _dest(*legs)
        for rand in (0.0, 0.5, 0.999999, 1.0):
            assert choose_subset(dest, rand) == expected
    three = _dest(("v1", 50), ("v2", 0), ("v3", 50))
    assert {choose_subset(three, i / 100) for i in range(100)} == {"v1", "v3"}


def test_no_split_means_any_instance() -> None:
    assert choose_subset(None, 0.3) is None
    assert choose_subset(DestinationRoutes("payments"), 0.3) is None
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


def test_route_decision_and_reasons() -> None:
    rr = RoundRobin()
    dest = _dest(("v1", 100), ("v2", 0), timeout=2.5)
    view = _view(dest, _ep("a", "v1"), _ep("b", "v2"))
    decision = route(view, "payments", 0.42, rr)
    assert decision.endpoint == _ep("a", "v1")
    assert (decision.subset, decision.subset_label, decision.timeout) == ("v1", "v1", 2.5)

    unhealthy = _view(dest, _ep("a", "v1", healthy=False), _ep("b", "v2"))
    decision = route(unhealthy, "payments", 0.42, rr)
    assert decision.endpoint is None
    assert decision.reason == "no healthy endpoint of payments in subset v1"

    assert route(_view(None), "payments", 0.1, rr).reason == "no healthy endpoint of payments"
    decision = route(MeshView(), "payments", 0.1, rr)
    assert (decision.reason, decision.subset_label) == ("no endpoints known for payments", "")
