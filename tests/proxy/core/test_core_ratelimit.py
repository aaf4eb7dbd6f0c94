"""The local rate limiter's pure core: token buckets by tables, keyed buckets bounded by LRU,
limits kept or started afresh across route-table reloads."""

from __future__ import annotations

import pytest

from meshd.config.schema import RateLimit
from meshd.proxy.core.ratelimit import (
    RateLimits,
    RouteLimiter,
    TokenBucket,
    limit_key,
    retry_after,
)

# (rate, burst, [(now, expected wait)...]): 0.0 = the request goes
BUCKET_CASES = [
    pytest.param(10.0, 2, [(0.0, 0.0), (0.0, 0.0), (0.0, 0.1), (0.05, 0.05), (0.1, 0.0),
                           (0.1, 0.1)], id="burst then one every 100 ms"),
    pytest.param(1.0, 1, [(5.0, 0.0), (5.5, 0.5), (6.0, 0.0), (6.0, 1.0)], id="one per second"),
    pytest.param(2.0, 3, [(0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.5), (100.0, 0.0),
                          (100.0, 0.0), (100.0, 0.0), (100.0, 0.5)],
                 id="an idle bucket refills to its burst, never beyond"),
    pytest.param(10.0, 1, [(1.0, 0.0), (0.5, 0.1), (1.1, 0.0)],
                 id="a clock read earlier never takes tokens back"),
    pytest.param(0.5, 1, [(0.0, 0.0), (1.0, 1.0), (2.0, 0.0)], id="below one per second"),
]


@pytest.mark.parametrize(("rate", "burst", "steps"), BUCKET_CASES)
def test_token_bucket(rate: float, burst: int, steps: list[tuple[float, float]]) -> None:
    bucket = TokenBucket(rate, burst, steps[0][0])
    got = [round(bucket.take(now), 6) for now, _ in steps]
    assert got == [wait for _, wait in steps]


def test_refills_at_the_rate_over_many_small_steps() -> None:
    """Float rounding over 1000 steps of 10 ms at 100/s neither loses nor gains a request."""
    bucket = TokenBucket(100.0, 1, 0.0)
    allowed = sum(bucket.take(i * 0.01) == 0.0 for i in range(1000))
    assert allowed == 1000
    bucket = TokenBucket(50.0, 1, 0.0)
    allowed = sum(bucket.take(i * 0.01) == 0.0 for i in range(1000))
    assert allowed == 500


@pytest.mark.parametrize(("wait", "seconds"), [(0.001, 1), (0.5, 1), (1.0, 1), (1.2, 2),
                                               (59.9, 60)])
def test_retry_after_is_whole_seconds_rounded_up(wait: float, seconds: int) -> None:
    assert retry_after(wait) == seconds


def test_keys_have_their_own_buckets_and_their_number_is_bounded() -> None:
    limiter = RouteLimiter(RateLimit(1.0, 1, "header:x-api-key"), max_keys=3)
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) > 0  # a's bucket is empty
    assert limiter.take("b", 0.0) == 0.0  # b has its own
    assert limiter.take("c", 0.0) == 0.0
    assert limiter.take("a", 0.0) > 0  # a is now the most recently used
    assert limiter.take("d", 0.0) == 0.0  # the 4th key drops the least recently used: b
    assert limiter.keys == 3
    assert limiter.take("b", 0.0) == 0.0  # b comes back full (dropping c)
    assert limiter.take("a", 0.0) > 0  # a was kept, still empty
    for i in range(10_000):
        limiter.take(f"k{i}", 0.0)
    assert limiter.keys == 3


def test_limit_key() -> None:
    headers = {"x-api-key": "k1"}
    assert limit_key(RateLimit(1.0, 1), "web", headers.get) == ""
    assert limit_key(RateLimit(1.0, 1, "source"), "web", headers.get) == "web"
    assert limit_key(RateLimit(1.0, 1, "header:x-api-key"), "web", headers.get) == "k1"
    # without the header: one bucket shared by all such requests, not a way around the limit
    assert limit_key(RateLimit(1.0, 1, "header:x-user"), "web", headers.get) == ""


def test_routes_keep_their_buckets_until_their_limit_changes() -> None:
    limits = RateLimits()
    one = RateLimit(1.0, 1)
    assert limits.take("payments", "api", one, "", 0.0) == 0.0
    assert limits.take("payments", "api", one, "", 0.0) > 0
    assert limits.take("payments", "other", one, "", 0.0) == 0.0  # routes are separate
    assert limits.take("cart", "api", one, "", 0.0) == 0.0  # and destinations
    # a reloaded table with the same limit: the same (empty) bucket
    assert limits.take("payments", "api", RateLimit(1.0, 1), "", 0.0) > 0
    # a changed limit starts full
    assert limits.take("payments", "api", RateLimit(2.0, 1), "", 0.0) == 0.0


def test_routes_with_buckets_are_bounded() -> None:
    limits = RateLimits(max_routes=2)
    one = RateLimit(1.0, 1)
    for route in ("a", "b", "c"):
        limits.take("payments", route, one, "", 0.0)
    assert limits.limiter("payments", "a") is None
    assert limits.limiter("payments", "c") is not None
