"""Fault injection: which requests a route delays or aborts on purpose. Pure.

Two independent draws per request: one against ``delay_percent``, one against
``abort_percent``. A request may get both: it waits, then gets the abort status (as Istio
does), without the destination ever being called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshd.config.schema import FaultPolicy


@dataclass(frozen=True)
class FaultAction:
    delay: float | None = None
    abort_status: int | None = None

    @property
    def none(self) -> bool:
        return self.delay is None and self.abort_status is None


NO_FAULT = FaultAction()


def _hit(percent: float, draw: float) -> bool:
    return percent > 0 and draw * 100 < percent


def decide_fault(policy: FaultPolicy | None, rand: Callable[[], float]) -> FaultAction:
    """The fault to inject into one request (``rand``: uniform draws in ``[0, 1)``)."""
    if policy is None:
        return NO_FAULT
    delay = policy.delay if policy.delay is not None and _hit(policy.delay_percent,
                                                                rand()) else None
    abort = (policy.abort_status if policy.abort_status is not None
             and _hit(policy.abort_percent, rand()) else None)
    if delay is None and abort is None:
        return NO_FAULT
    return FaultAction(delay, abort)


def mirrored(percent: float, draw: float) -> bool:
    """Whether a request is copied to a route's mirror (``percent`` of requests)."""
    return _hit(percent, draw)
