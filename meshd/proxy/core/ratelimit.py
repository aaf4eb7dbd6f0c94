"""Local rate limiting: a token bucket per route per meshd, optionally one per key (the calling
service, or a header's value). Pure: ``now`` is passed in.

A bucket holds at most ``burst`` tokens and starts full; ``requests_per_second`` tokens flow
back continuously. A request takes a token or is refused, and learns how long until the next
one comes (its 429's ``retry-after``). Keyed buckets of a route are bounded in number
(``MAX_KEYS``, least recently used dropped first), so a client sending ever-new keys costs a
bounded amount of memory; a dropped bucket comes back full, which is what an idle one would
be anyway once ``burst / requests_per_second`` seconds passed.

``RateLimits`` holds every route's buckets for one meshd, across route-table reloads: a route
whose limit is unchanged keeps its buckets; a changed limit starts afresh (full). With
``workers`` processes each holds its share (``meshd.workers.plan``): the rate divided among
them, the burst too (rounded up, at least one token), so the host stays within the limit.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from meshd.config.schema import RATE_LIMIT_SOURCE, RateLimit

MAX_KEYS = 10_000  # keyed buckets per route (about 100 bytes each)
MAX_ROUTES = 1024  # routes with a rate limit, over the table's lifetime (LRU as well)
# what float rounding may leave of a whole token after refills (0.1 s at 10/s -> 0.9999...)
_EPSILON = 1e-9


class TokenBucket:
    """``take(now)``: 0.0 when a token was taken, else the seconds until one will be there."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        if now > self.stamp:  # a clock read earlier by another task never takes tokens back
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0 - _EPSILON:
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RouteLimiter:
    """One route's limit: one bucket, or one per key (at most ``max_keys``, LRU)."""

    def __init__(self, limit: RateLimit, max_keys: int = MAX_KEYS, workers: int = 1) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self.rate = limit.requests_per_second / workers
        self.burst = max(1, math.ceil(limit.burst / workers))
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(buckets) > self.max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
        return bucket.take(now)

    @property
    def keys(self) -> int:
        return len(self._buckets)


def limit_key(limit: RateLimit, source: str, header: Callable[[str], str | None]) -> str:
    """The bucket a request goes to: ``""`` (one bucket), the calling service (``source``) or
    the value of the limit's header (``header(name)``; absent: ``""``, one shared bucket, so
    leaving the header out is no way around the limit)."""
    if not limit.key:
        return ""
    if limit.key == RATE_LIMIT_SOURCE:
        return source
    name = limit.header
    assert name is not None
    return header(name) or ""


def retry_after(wait: float) -> int:
    """Whole seconds for ``retry-after`` (RFC 9110 10.2.3): the wait rounded up, at least 1."""
    return max(1, math.ceil(wait - _EPSILON))


class RateLimits:
    """Every rate-limited route's buckets on one meshd, by (destination, route name)."""

    def __init__(self, max_keys: int = MAX_KEYS, max_routes: int = MAX_ROUTES,
                 workers: int = 1) -> None:
        self.max_keys = max_keys
        self.max_routes = max_routes
        self.workers = workers  # this process's share is 1 / workers of each limit
        self._routes: OrderedDict[tuple[str, str], RouteLimiter] = OrderedDict()

    def take(self, destination: str, route: str, limit: RateLimit, key: str,
             now: float) -> float:
        """0.0 when the request may go, else the seconds until ``key``'s bucket has a token."""
        name = (destination, route)
        limiter = self._routes.get(name)
        if limiter is None or limiter.limit != limit:
            limiter = self._routes[name] = RouteLimiter(limit, self.max_keys, self.workers)
            if len(self._routes) > self.max_routes:
                self._routes.popitem(last=False)
        self._routes.move_to_end(name)
        return limiter.take(key, now)

    def limiter(self, destination: str, route: str) -> RouteLimiter | None:
        return self._routes.get((destination, route))
