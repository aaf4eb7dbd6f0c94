"""Subset choice and endpoint picking: pure, replayable draws."""

from __future__ import annotations

import random
from types import MappingProxyType

from meshd.config.schema import (
    DestinationPolicy,
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
from meshd.proxy.core.router import (
    Tier,
    candidates,
    choose_subset,
    fresh_left,
    locality_rank,
    no_endpoint_reason,
    plan,
    usable,
)
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


# -- failover between subsets, locality -------------------------------------------------------

def _zoned(node: str, version: str, zone: str, region: str = "eu",
           healthy: bool = True) -> Endpoint:
    return Endpoint("payments", f"payments-{version}", node, "10.0.0.9", 15001, version,
                    healthy, (("region", region), ("zone", zone)))


def _failing_over(*, locality: tuple[str, ...] = (),
                  v1_failover: tuple[str, ...] = ("v2", "v3")) -> DestinationRoutes:
    return DestinationRoutes(
        "payments", subsets=(Subset("v1", "v1", v1_failover), Subset("v2", "v2", ("v1",)),
                             Subset("v3", "v3")),
        split=(SplitLeg("v1", 100),), policy=DestinationPolicy(locality=locality))


def _keys(tier: Tier | None, pool: tuple[Endpoint, ...]) -> tuple[str | None, list[str]]:
    return (tier.subset if tier is not None else None), [e.node for e in pool]


def test_a_subset_without_healthy_endpoints_fails_over_in_declared_order() -> None:
    dest = _failing_over()
    sick = (_ep("a", "v1", healthy=False), _ep("b", "v1", healthy=False))
    routed = plan(_view(dest, *sick, _ep("c", "v2"), _ep("d", "v3")), "payments", None, 0.0)
    assert [(t.subset, t.failover) for t in routed.tiers] == [("v2", True), ("v3", True)]
    assert _keys(*usable(routed.tiers, ())[:2]) == ("v2", ["c"])
    # only the drawn subset's own list is followed: v2 -> v1 does not loop back
    only_v3 = plan(_view(dest, *sick, _ep("d", "v3")), "payments", None, 0.0)
    assert _keys(*usable(only_v3.tiers, ())[:2]) == ("v3", ["d"])
    nothing = _view(_failing_over(v1_failover=("v2",)), *sick, _ep("d", "v3"))
    assert plan(nothing, "payments", None, 0.0).candidates == ()
    assert no_endpoint_reason(nothing, "payments", "v1") == \
        "no healthy endpoint of payments in subset v1 nor in its failover v2"


def test_ejected_and_tried_endpoints_move_on_to_the_next_tier() -> None:
    dest = _failing_over()
    view = _view(dest, _ep("a", "v1"), _ep("b", "v1"), _ep("c", "v2"))
    found = plan(view, "payments", None, 0.0).tiers
    assert [t.subset for t in found] == ["v1", "v2"]
    ejected = {"a/payments-v1"}
    assert _keys(*usable(found, ejected)[:2]) == ("v1", ["b"])
    # every v1 endpoint ejected: v2 rather than a panic
    both = {"a/payments-v1", "b/payments-v1"}
    assert usable(found, both) == (found[1], (found[1].endpoints[0],), False)
    # a retry that tried all of v1 goes on to v2; then, all tried, again where not ejected
    assert _keys(*usable(found, (), both)[:2]) == ("v2", ["c"])
    everyone = both | {"c/payments-v2"}
    assert _keys(*usable(found, ejected, everyone)[:2]) == ("v1", ["b"])
    assert fresh_left(found, ejected, {"b/payments-v1"}) is True
    assert fresh_left(found, ejected, {"b/payments-v1", "c/payments-v2"}) is False
    # everything ejected: a panic in the first tier, untried endpoints first
    tier, pool, panic = usable(found, everyone, {"a/payments-v1"})
    assert (tier, [e.node for e in pool], panic) == (found[0], ["b"], True)
    assert usable((), ()) == (None, (), False)


def test_locality_prefers_the_callers_zone_then_region_then_anything() -> None:
    here = (("region", "eu"), ("zone", "eu-1"))
    dest = _failing_over(locality=("region", "zone"))
    near, same_region, far = (_zoned("a", "v1", "eu-1"), _zoned("b", "v1", "eu-2"),
                              _zoned("c", "v1", "us-1", region="us"))
    found = plan(_view(dest, far, same_region, near), "payments", None, 0.0, here).tiers
    assert [(t.rank, [e.node for e in t.endpoints]) for t in found] == [
        (0, ["a"]), (1, ["b"]), (2, ["c"])]
    assert [locality_rank(here, e, ("region", "zone")) for e in (near, same_region, far)] == \
        [0, 1, 2]
    assert locality_rank((), near, ("region", "zone")) == 2  # a host without labels: no rank
    assert _keys(*usable(found, ())[:2]) == ("v1", ["a"])
    assert _keys(*usable(found, {"a/payments-v1"})[:2]) == ("v1", ["b"])  # zone out: region
    # locality ranks within a subset: the drawn subset's far endpoint before a near failover
    sick_near = _zoned("a", "v1", "eu-1", healthy=False)
    v2_near = _zoned("d", "v2", "eu-1")
    found = plan(_view(dest, sick_near, far, v2_near), "payments", None, 0.0, here).tiers
    assert [(t.subset, t.rank) for t in found] == [("v1", 2), ("v2", 0)]


def test_without_a_split_there_is_one_subset_and_locality_still_applies() -> None:
    dest = DestinationRoutes("payments", policy=DestinationPolicy(locality=("zone",)))
    found = plan(_view(dest, _zoned("a", "v1", "z2"), _zoned("b", "v2", "z1")), "payments",
                 None, 0.0, (("zone", "z1"),)).tiers
    assert [(t.subset, t.rank, [e.node for e in t.endpoints]) for t in found] == [
        (None, 0, ["b"]), (None, 1, ["a"])]


def test_a_retry_prefers_an_ejected_endpoint_to_one_that_just_failed_it() -> None:
    """b is ejected (an older guess); a just failed this request: the retry tries b."""
    found = plan(_view(_dest(("v1", 100)), _ep("a", "v1"), _ep("b", "v1")), "payments", None,
                 0.0).tiers
    assert _keys(*usable(found, {"b/payments-v1"})[:2]) == ("v1", ["a"])  # a first try
    _tier, pool, panic = usable(found, {"b/payments-v1"}, {"a/payments-v1"})
    assert ([e.node for e in pool], panic) == (["b"], True)
