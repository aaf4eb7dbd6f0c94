"""The live state of each destination on this host: the trio shell around the pure cores.

One ``DestinationState`` per destination service, shared by every local service that calls
it: its balancer, requests in flight per endpoint (least_request reads them, operators see
them), the circuit breaker with its line of waiting requests, the outlier detector and the
retry budget. A request reads the route table once and hands its destination's policy to
``Destinations.get``; a changed policy is applied in place, so counts, ejections and waiting
requests survive a reload.

With ``workers`` processes (``meshd.workers.plan``), each worker's breaker and retry budget
floor hold its share of the policy's limits, and an ejection this worker decides is announced
(``on_ejection``) so that the others put it in force too (``impose``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from meshd.config.schema import DEFAULT_MAX_PENDING, DestinationPolicy, OutlierDetection
from meshd.config.schema import RetryBudget as RetryBudgetConfig
from meshd.metrics import Metrics
from meshd.proxy.core.balancer import Balancer, PickInputs, make_balancer
from meshd.proxy.core.breaker import Admission, CircuitBreaker
from meshd.proxy.core.outlier import Ejection, Outcome, OutlierDetector
from meshd.proxy.core.retry import RetryBudget
from meshd.proxy.core.router import Tier, fresh_left, usable
from meshd.registry.model import Endpoint, EndpointSet
from meshd.workers.plan import share, share_rate

log = logging.getLogger(__name__)

DEFAULT_POLICY = DestinationPolicy()


@dataclass(eq=False)
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    granted: bool = False


def _pending_limit(policy: DestinationPolicy) -> int | None:
    if policy.max_connections is None:
        return None
    if policy.max_pending_requests is None:
        return DEFAULT_MAX_PENDING
    return policy.max_pending_requests


def _budget(policy: DestinationPolicy, workers: int) -> RetryBudgetConfig:
    config = policy.retry_budget or RetryBudgetConfig()
    if workers <= 1:
        return config
    return RetryBudgetConfig(ratio=config.ratio, min_retries_per_second=share_rate(
        config.min_retries_per_second, workers))


EjectionListener = Callable[[str, Ejection], None]


class DestinationState:
    def __init__(self, name: str, policy: DestinationPolicy, metrics: Metrics, *,
                 workers: int = 1, on_ejection: EjectionListener | None = None) -> None:
        self.name = name
        self.metrics = metrics
        self.policy = policy
        self.workers = workers  # this process holds 1 / workers of the limits
        self.on_ejection = on_ejection
        self.balancer: Balancer = make_balancer(policy.load_balancer)
        self.breaker = CircuitBreaker(share(policy.max_connections, workers),
                                      share(_pending_limit(policy), workers))
        self.outlier = OutlierDetector(policy.outlier_detection or OutlierDetection())
        self.budget = RetryBudget(_budget(policy, workers))
        self.in_flight: dict[str, int] = {}  # endpoint key -> tries in progress
        self._waiters: deque[_Waiter] = deque()
        self._endpoints: EndpointSet | None = None

    def sync(self, policy: DestinationPolicy) -> None:
        """Apply ``policy`` if it changed (a reload), keeping counts and ejections."""
        if policy is self.policy or policy == self.policy:
            self.policy = policy
            return
        old, self.policy = self.policy, policy
        if policy.load_balancer is not old.load_balancer:
            self.balancer = make_balancer(policy.load_balancer)
        promoted = self.breaker.configure(share(policy.max_connections, self.workers),
                                          share(_pending_limit(policy), self.workers))
        for _ in range(promoted):
            self._wake_next()
        self.outlier.configure(policy.outlier_detection or OutlierDetection())
        self.budget.configure(_budget(policy, self.workers))

    # -- circuit breaking ----------------------------------------------------------------------

    async def acquire(self) -> bool:
        """A connection slot: at once, after waiting in line, or False (limits reached).
        Every True must be paired with ``release``."""
        admission = self.breaker.admit()
        if admission is Admission.ACTIVE:
            return True
        if admission is Admission.REJECTED:
            self.metrics.circuit_breaker_rejections.labels(self.name).inc()
            return False
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:  # the slot came as we were cancelled: pass it on
                self.release()
            else:
                self._waiters.remove(waiter)
                self.breaker.withdraw()
            raise
        return True

    def release(self) -> None:
        if self.breaker.release():
            self._wake_next()

    def _wake_next(self) -> None:
        waiter = self._waiters.popleft()
        waiter.granted = True
        waiter.event.set()

    def rejection_reason(self) -> str:
        return self.breaker.rejection_reason()

    # -- endpoints -----------------------------------------------------------------------------

    def pick(self, found: Sequence[Tier], now: float, rand: Callable[[], float],
             hash_key: str | None = None, avoid: Collection[str] = ()
             ) -> tuple[Endpoint, Tier] | None:
        """An endpoint for one try, and its tier: the first tier with an endpoint not ejected
        and not yet tried by this request (``router.usable``), by the destination's
        balancer."""
        tier, pool, _panic = usable(found, self.outlier.ejected(now), avoid)
        if tier is None:
            return None
        # Retries rotate on their own cursor, so the first tries keep an even rotation (a
        # failing endpoint is not made everyone's first pick by the retries after it).
        key = ((self.name, tier.subset or "", tier.rank, "retry") if avoid
               else (self.name, tier.subset or "", tier.rank))
        endpoint = self.balancer.pick(key, pool, PickInputs(rand, self._load_of, hash_key))
        return (endpoint, tier) if endpoint is not None else None

    def fresh_left(self, found: Sequence[Tier], now: float, avoid: Collection[str]) -> bool:
        """Whether an endpoint neither ejected nor tried is left (``router.fresh_left``)."""
        return fresh_left(found, self.outlier.ejected(now), avoid)

    def _load_of(self, endpoint: Endpoint) -> int:
        return self.in_flight.get(endpoint.key, 0)

    def begin(self, endpoint: Endpoint) -> None:
        self.in_flight[endpoint.key] = self.in_flight.get(endpoint.key, 0) + 1

    def end(self, endpoint: Endpoint) -> None:
        left = self.in_flight.get(endpoint.key, 1) - 1
        if left:
            self.in_flight[endpoint.key] = left
        else:
            self.in_flight.pop(endpoint.key, None)

    def record(self, endpoint: Endpoint, outcome: Outcome, now: float,
               endpoints: EndpointSet | None) -> None:
        """Feed the outlier detector (only when the policy asks for detection)."""
        if self.policy.outlier_detection is None:
            return
        if endpoints is not self._endpoints and endpoints is not None:
            self._endpoints = endpoints  # a new view: forget endpoints that left it
            self.outlier.forget_except({e.key for e in endpoints.endpoints})
        population = len(endpoints.healthy()) if endpoints is not None else 0
        ejection = self.outlier.record(endpoint.key, outcome, now, population)
        if ejection is not None:
            self.metrics.ejections.labels(self.name, ejection.reason).inc()
            log.warning("%s: endpoint %s ejected for %.1fs after consecutive %s (ejection %d)",
                        self.name, endpoint.key, ejection.duration, ejection.reason,
                        ejection.count)
            if self.on_ejection is not None:
                self.on_ejection(self.name, ejection)

    def endpoint_state(self, endpoint: Endpoint, now: float) -> dict[str, Any]:
        health = self.outlier.health(endpoint.key, now)
        return {
            "ejected": health.ejected,
            "ejection_remaining_seconds": round(health.ejection_remaining, 3),
            "ejections": health.ejections,
            "ejection_reason": health.reason,
            "active_requests": self.in_flight.get(endpoint.key, 0),
        }


class Destinations:
    """Every destination's state, created on first use."""

    def __init__(self, metrics: Metrics, *, workers: int = 1,
                 on_ejection: EjectionListener | None = None) -> None:
        self.metrics = metrics
        self.workers = workers
        self.on_ejection = on_ejection
        self._states: dict[str, DestinationState] = {}

    def get(self, name: str, policy: DestinationPolicy | None) -> DestinationState:
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = DestinationState(
                name, policy or DEFAULT_POLICY, self.metrics, workers=self.workers,
                on_ejection=self.on_ejection)
        else:
            state.sync(policy or DEFAULT_POLICY)
        return state

    def impose(self, name: str, ejection: Ejection, now: float) -> None:
        """An ejection another worker decided, in force here too (the destination's policy is
        applied on its next request, as ``get`` does; the ejection stays)."""
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = DestinationState(
                name, DEFAULT_POLICY, self.metrics, workers=self.workers,
                on_ejection=self.on_ejection)
        state.outlier.impose(ejection, now)
        log.info("%s: endpoint %s ejected for %.1fs by another worker (%s)", name,
                 ejection.endpoint, ejection.duration, ejection.reason)

    def known(self, name: str) -> DestinationState | None:
        return self._states.get(name)
