"""Outlier detection: endpoints that keep failing are ejected for a while. Pure.

One detector per destination, fed every outcome of every try (``record(endpoint, outcome, now,
population)``): a status code, or a ``Failure`` when no response came. A run of
``consecutive_5xx`` failed answers (5xx, reset, per-try timeout) or ``consecutive_connect_
failures`` failed connects ejects the endpoint for ``base_ejection_time`` times its number of
ejections (capped at ``max_ejection_time``): an endpoint that fails again right after coming
back stays out longer each time. Once back for a whole ``interval`` without a new ejection, that
number drops by one. Any answer below 500 ends a run.

``max_ejection_percent`` bounds the endpoints out at once, as a share of ``population`` (the
destination's healthy endpoints): never more, so a destination-wide failure cannot eject
everything. If every candidate of a request is ejected anyway (a small subset), the request
ignores ejection rather than fail for sure ("panic", as Envoy calls it): see ``admitted``.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from meshd.config.schema import OutlierDetection
from meshd.registry.model import Endpoint


class Failure(StrEnum):
    """A try that got no response."""

    CONNECT = "connect-failure"  # no connection (refused, unreachable, TLS refused, timeout)
    RESET = "reset"  # the connection broke before a response head arrived
    TIMEOUT = "timeout"  # the per-try timeout passed before a response head arrived


Outcome = int | Failure
CONNECTED: Outcome = 200  # a TCP connection made: counts as an answer below 500


def is_5xx_like(outcome: Outcome) -> bool:
    """A failed answer: a 5xx, or a connection that got no response after connecting."""
    if isinstance(outcome, Failure):
        return outcome is not Failure.CONNECT
    return outcome >= 500


@dataclass
class _Health:
    consecutive_5xx: int = 0
    consecutive_connect: int = 0
    ejections: int = 0  # the multiplier of the next ejection time, decays while back
    ejected_until: float | None = None
    back_since: float | None = None  # when the current decay period started
    reason: str = ""


@dataclass(frozen=True)
class Ejection:
    endpoint: Hashable
    duration: float
    reason: str  # "5xx" or "connect-failure"
    count: int


@dataclass(frozen=True)
class EndpointHealth:
    """What an operator sees of one endpoint (``meshd explain``, ``/v1/state``)."""

    ejected: bool
    ejection_remaining: float
    ejections: int
    consecutive_5xx: int
    consecutive_connect_failures: int
    reason: str


class OutlierDetector:
    def __init__(self, config: OutlierDetection) -> None:
        self.config = config
        self._health: dict[Hashable, _Health] = {}
        self._out: set[Hashable] = set()  # endpoints with an ejection in force (or just over)

    def configure(self, config: OutlierDetection) -> None:
        """New thresholds; ejections in force run their course."""
        self.config = config

    def _refresh(self, h: _Health, now: float) -> None:
        """Re-admit once the ejection time is over, and decay the multiplier while back."""
        if h.ejected_until is not None:
            if now < h.ejected_until:
                return
            h.back_since = h.ejected_until
            h.ejected_until = None
            h.consecutive_5xx = h.consecutive_connect = 0
        if h.back_since is not None and h.ejections:
            periods = int((now - h.back_since) // self.config.interval)
            if periods > 0:
                h.ejections = max(0, h.ejections - periods)
                h.back_since += periods * self.config.interval

    def is_ejected(self, endpoint: Hashable, now: float) -> bool:
        h = self._health.get(endpoint)
        if h is None:
            return False
        self._refresh(h, now)
        return h.ejected_until is not None

    def ejected(self, now: float) -> frozenset[Hashable]:
        """The endpoints ejected at ``now`` (re-admitting those whose time is over)."""
        if not self._out:
            return frozenset()
        for key in list(self._out):
            h = self._health[key]
            self._refresh(h, now)
            if h.ejected_until is None:
                self._out.discard(key)
        return frozenset(self._out)

    def record(self, endpoint: Hashable, outcome: Outcome, now: float,
               population: int) -> Ejection | None:
        """Count one outcome; returns the ejection it caused, if any."""
        h = self._health.get(endpoint)
        if h is None:
            h = self._health[endpoint] = _Health()
        self._refresh(h, now)
        if h.ejected_until is not None:
            return None  # tried while ejected (panic): it is out already
        c = self.config
        if outcome is Failure.CONNECT:
            h.consecutive_connect += 1
        elif is_5xx_like(outcome):
            h.consecutive_5xx += 1
            h.consecutive_connect = 0
        else:
            h.consecutive_5xx = h.consecutive_connect = 0
            return None
        if 0 < c.consecutive_connect_failures <= h.consecutive_connect:
            reason = "connect-failure"
        elif 0 < c.consecutive_5xx <= h.consecutive_5xx:
            reason = "5xx"
        else:
            return None
        allowed = population * c.max_ejection_percent // 100
        if len(self.ejected(now)) >= allowed:
            return None  # at the limit: keep counting, eject when there is room
        h.ejections += 1
        duration = min(c.base_ejection_time * h.ejections, c.max_ejection_time)
        h.ejected_until = now + duration
        h.back_since = None
        self._out.add(endpoint)
        h.consecutive_5xx = h.consecutive_connect = 0
        h.reason = reason
        return Ejection(endpoint, duration, reason, h.ejections)

    def impose(self, ejection: Ejection, now: float) -> None:
        """Put in force an ejection decided elsewhere (another worker process of this host):
        ``ejection.duration`` from ``now``, as if counted here; a longer one in force stays."""
        h = self._health.get(ejection.endpoint)
        if h is None:
            h = self._health[ejection.endpoint] = _Health()
        self._refresh(h, now)
        until = now + ejection.duration
        if h.ejected_until is not None and h.ejected_until >= until:
            return
        h.ejections = max(h.ejections, ejection.count)
        h.ejected_until = until
        h.back_since = None
        h.consecutive_5xx = h.consecutive_connect = 0
        h.reason = ejection.reason
        self._out.add(ejection.endpoint)

    def health(self, endpoint: Hashable, now: float) -> EndpointHealth:
        h = self._health.get(endpoint)
        if h is None:
            return EndpointHealth(False, 0.0, 0, 0, 0, "")
        self._refresh(h, now)
        until = h.ejected_until
        return EndpointHealth(until is not None, max(0.0, until - now) if until else 0.0,
                              h.ejections, h.consecutive_5xx, h.consecutive_connect,
                              h.reason if until is not None else "")

    def forget_except(self, keep: Collection[Hashable]) -> None:
        """Drop what is known about endpoints no longer in the view (bounds memory)."""
        for key in [k for k in self._health if k not in keep]:
            del self._health[key]
            self._out.discard(key)


def admitted(candidates: Sequence[Endpoint], ejected: Collection[Hashable]) -> tuple[
        tuple[Endpoint, ...], bool]:
    """The candidates not ejected (by ``Endpoint.key``), and whether it is a panic: every
    candidate is ejected, so all of them are returned instead of none."""
    if not ejected:
        return tuple(candidates), False
    kept = tuple(e for e in candidates if e.key not in ejected)
    if kept or not candidates:
        return kept, False
    return tuple(candidates), True
