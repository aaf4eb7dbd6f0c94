"""Load balancers: which of a route's candidate endpoints takes a request. Pure.

Each balancer picks from whatever candidate list the call brings (healthy, not ejected, of the
chosen subset), so the list may change between calls. Randomness comes in as ``rand`` (a
callable returning uniform draws in ``[0, 1)``) and load as ``load`` (requests in flight per
endpoint), so every pick is replayable in a test.

* ``round_robin``: one cursor per key (destination, subset).
* ``random``: one uniform draw.
* ``least_request``: power of two choices: two distinct random candidates, the one with fewer
  requests in flight wins (ties go to the first drawn) — nearly as good as scanning for the
  least loaded, without herding every caller onto the same one.
* ``ring_hash``: a consistent-hash ring of the candidates, each with ``VNODES`` points; a
  request's hash key (a header's value or the client address) lands on the next point. Losing
  an endpoint moves only the keys that were on it. A request without a key is spread at random.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from meshd.config.schema import LoadBalancer
from meshd.registry.model import Endpoint

VNODES = 100  # points per endpoint on a ring: keeps the spread within a few % of even
RING_CACHE = 16  # rings kept (one per distinct candidate list in use)


@dataclass(frozen=True)
class PickInputs:
    """What a pick may depend on besides the candidates."""

    rand: Callable[[], float]
    load: Callable[[Endpoint], int] = lambda endpoint: 0
    hash_key: str | None = None


class RoundRobin:
    """Round robin over whatever candidate list each call brings, one cursor per key.

    The candidate list may change between calls (endpoints come and go); the cursor keeps
    advancing modulo the current length, which spreads load evenly while the list is stable and
    never fails when it shrinks."""

    kind = LoadBalancer.ROUND_ROBIN

    def __init__(self) -> None:
        self._cursors: dict[Hashable, int] = {}

    def pick(self, key: Hashable, endpoints: Sequence[Endpoint],
             inputs: PickInputs | None = None) -> Endpoint | None:
        if not endpoints:
            return None
        cursor = self._cursors.get(key, 0)
        self._cursors[key] = (cursor + 1) % (1 << 30)
        return endpoints[cursor % len(endpoints)]


def _index(rand: Callable[[], float], n: int) -> int:
    return min(int(rand() * n), n - 1)


class RandomPick:
    kind = LoadBalancer.RANDOM

    def pick(self, key: Hashable, endpoints: Sequence[Endpoint],
             inputs: PickInputs | None = None) -> Endpoint | None:
        if not endpoints:
            return None
        assert inputs is not None
        return endpoints[_index(inputs.rand, len(endpoints))]


class LeastRequest:
    kind = LoadBalancer.LEAST_REQUEST

    def pick(self, key: Hashable, endpoints: Sequence[Endpoint],
             inputs: PickInputs | None = None) -> Endpoint | None:
        n = len(endpoints)
        if n == 0:
            return None
        if n == 1:
            return endpoints[0]
        assert inputs is not None
        first = _index(inputs.rand, n)
        second = _index(inputs.rand, n - 1)
        if second >= first:  # a second draw among the others: always distinct
            second += 1
        a, b = endpoints[first], endpoints[second]
        return b if inputs.load(b) < inputs.load(a) else a


def hash64(text: str) -> int:
    """A stable 64-bit hash (Python's ``hash`` is salted per process; rings must agree
    across meshd restarts and hosts)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"),
                                          digest_size=8).digest(), "big")


class Ring:
    """A consistent-hash ring over ``endpoints``."""

    def __init__(self, endpoints: Sequence[Endpoint], vnodes: int = VNODES) -> None:
        points = sorted((hash64(f"{e.key}#{i}"), idx)
                        for idx, e in enumerate(endpoints) for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [endpoints[idx] for _, idx in points]

    def lookup(self, key: str) -> Endpoint | None:
        if not self._hashes:
            return None
        i = bisect.bisect_left(self._hashes, hash64(key))
        return self._owners[i % len(self._owners)]


class RingHash:
    kind = LoadBalancer.RING_HASH

    def __init__(self) -> None:
        self._rings: OrderedDict[tuple[str, ...], Ring] = OrderedDict()

    def ring(self, endpoints: Sequence[Endpoint]) -> Ring:
        ident = tuple(e.key for e in endpoints)
        ring = self._rings.get(ident)
        if ring is None:
            ring = self._rings[ident] = Ring(endpoints)
            while len(self._rings) > RING_CACHE:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(ident)
        return ring

    def pick(self, key: Hashable, endpoints: Sequence[Endpoint],
             inputs: PickInputs | None = None) -> Endpoint | None:
        if not endpoints:
            return None
        assert inputs is not None
        if inputs.hash_key is None:
            return endpoints[_index(inputs.rand, len(endpoints))]
        return self.ring(endpoints).lookup(inputs.hash_key)


Balancer = RoundRobin | RandomPick | LeastRequest | RingHash


def make_balancer(kind: LoadBalancer) -> Balancer:
    if kind is LoadBalancer.LEAST_REQUEST:
        return LeastRequest()
    if kind is LoadBalancer.RANDOM:
        return RandomPick()
    if kind is LoadBalancer.RING_HASH:
        return RingHash()
    return RoundRobin()
