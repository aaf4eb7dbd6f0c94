"""Load balancers: table tests with injected draws and loads."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator

from meshd.config.schema import LoadBalancer
from meshd.proxy.core.balancer import (
    LeastRequest,
    PickInputs,
    RandomPick,
    RingHash,
    RoundRobin,
    make_balancer,
)
from meshd.registry.model import Endpoint


def _ep(i: int) -> Endpoint:
    return Endpoint("payments", f"payments-{i}", f"n{i}", f"10.0.0.{i}", 15001, "v1")


EPS = tuple(_ep(i) for i in range(4))


def _draws(*values: float) -> Callable[[], float]:
    it: Iterator[float] = iter(values)
    return lambda: next(it)


def test_make_balancer_by_kind() -> None:
    assert isinstance(make_balancer(LoadBalancer.ROUND_ROBIN), RoundRobin)
    assert isinstance(make_balancer(LoadBalancer.LEAST_REQUEST), LeastRequest)
    assert isinstance(make_balancer(LoadBalancer.RANDOM), RandomPick)
    assert isinstance(make_balancer(LoadBalancer.RING_HASH), RingHash)


def test_random_maps_draws_to_positions() -> None:
    rnd = RandomPick()
    for draw, expected in ((0.0, 0), (0.2499, 0), (0.25, 1), (0.99999, 3), (1.0, 3)):
        assert rnd.pick("k", EPS, PickInputs(_draws(draw))) == EPS[expected]
    assert rnd.pick("k", (), PickInputs(_draws())) is None


def test_least_request_two_distinct_choices_fewer_in_flight_wins() -> None:
    lr = LeastRequest()
    load = {EPS[0].key: 5, EPS[1].key: 1, EPS[2].key: 0, EPS[3].key: 9}

    def inputs(*draws: float) -> PickInputs:
        return PickInputs(_draws(*draws), lambda e: load[e.key])

    # draws -> first index, second index among the remaining three
    assert lr.pick("k", EPS, inputs(0.0, 0.0)) == EPS[1]  # 0 (5) vs 1 (1)
    assert lr.pick("k", EPS, inputs(0.0, 0.99)) == EPS[0]  # 0 (5) vs 3 (9)
    assert lr.pick("k", EPS, inputs(0.5, 0.5)) == EPS[2]  # 2 (0) vs 3: never itself
    assert lr.pick("k", EPS, inputs(0.99, 0.99)) == EPS[2]  # 3 (9) vs 2 (0)
    assert lr.pick("k", EPS[:1], inputs()) == EPS[0]  # one candidate: no draw at all
    # ties go to the first drawn
    even = PickInputs(_draws(0.75, 0.0), lambda e: 1)
    assert lr.pick("k", EPS, even) == EPS[3]


def test_least_request_steers_away_from_a_loaded_endpoint() -> None:
    rng = random.Random(7)
    load = {e.key: 0 for e in EPS}
    load[EPS[0].key] = 100  # a slow endpoint with many requests in flight
    picks = Counter(LeastRequest().pick("k", EPS, PickInputs(rng.random, lambda e: load[e.key]))
                    for _ in range(3000))
    assert picks[EPS[0]] == 0  # it only ever wins against itself, and P2C never draws twice
    assert min(picks[e] for e in EPS[1:]) > 800


def test_ring_hash_is_sticky_and_moves_only_the_lost_endpoints_keys() -> None:
    ring = RingHash()
    keys = [f"user-{i}" for i in range(2000)]

    def owners(eps: tuple[Endpoint, ...]) -> dict[str, Endpoint | None]:
        return {k: ring.pick("k", eps, PickInputs(_draws(), hash_key=k)) for k in keys}

    before = owners(EPS)
    assert before == owners(EPS)  # sticky
    spread = Counter(before.values())
    assert min(spread.values()) > 2000 / 4 * 0.6  # 100 points each: within ~40 % of even
    after = owners(EPS[:3])  # EPS[3] leaves
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == EPS[3] for k in moved)
    # a fresh balancer (another host, a restart) builds the same ring
    fresh = RingHash()
    assert before == {k: fresh.pick("k", EPS, PickInputs(_draws(), hash_key=k)) for k in keys}


def test_ring_hash_without_a_key_spreads_at_random() -> None:
    assert RingHash().pick("k", EPS, PickInputs(_draws(0.5))) == EPS[2]
