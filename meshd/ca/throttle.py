"""How often one source may fail to join: per-address backoff against join-token guessing. Pure.

A join token's secret has at least 192 bits, so guessing cannot succeed, but unlimited guesses
cost the CA a locked transaction and an audit line each. After ``FREE_FAILURES`` failed joins
from one address, each further failure closes that address for twice as long as the last
(``FIRST_BLOCK`` doubling up to ``MAX_BLOCK``); an attempt while closed is answered 429 with
``Retry-After`` without touching the CA's state or its audit log (the moment an address is
closed is logged and audited once). A success, or ``FORGET_AFTER`` without a failure, clears the
address. The table is bounded: past ``MAX_SOURCES`` addresses the one idle longest is dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

FREE_FAILURES = 5
FIRST_BLOCK = 1.0  # seconds
MAX_BLOCK = 300.0
FORGET_AFTER = 900.0
MAX_SOURCES = 10_000


@dataclass
class _Source:
    failures: int = 0
    last_failure: float = 0.0
    closed_until: float = 0.0


class JoinThrottle:
    """Failed joins per source address; ``now`` is monotonic seconds, passed by the caller."""

    def __init__(self, *, free_failures: int = FREE_FAILURES, first_block: float = FIRST_BLOCK,
                 max_block: float = MAX_BLOCK, forget_after: float = FORGET_AFTER,
                 max_sources: int = MAX_SOURCES) -> None:
        self.free_failures = free_failures
        self.first_block = first_block
        self.max_block = max_block
        self.forget_after = forget_after
        self.max_sources = max_sources
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def retry_after(self, source: str, now: float) -> float:
        """Seconds until ``source`` may try again; 0 when it may now."""
        entry = self._current(source, now)
        return max(0.0, entry.closed_until - now) if entry is not None else 0.0

    def failed(self, source: str, now: float) -> float:
        """Record a failed join; returns how long ``source`` is now closed (0: not closed)."""
        entry = self._current(source, now)
        if entry is None:
            entry = self._sources[source] = _Source()
            while len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        self._sources.move_to_end(source)
        entry.failures += 1
        entry.last_failure = now
        over = entry.failures - self.free_failures
        if over <= 0:
            return 0.0
        block = min(self.max_block, self.first_block * 2.0 ** min(over - 1, 32))
        entry.closed_until = now + block
        return block

    def succeeded(self, source: str) -> None:
        self._sources.pop(source, None)

    def _current(self, source: str, now: float) -> _Source | None:
        entry = self._sources.get(source)
        if entry is not None and now - entry.last_failure >= self.forget_after \
                and now >= entry.closed_until:
            del self._sources[source]
            return None
        return entry
