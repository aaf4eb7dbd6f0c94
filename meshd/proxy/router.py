"""Which instance serves a request: subset by weighted split, then a healthy endpoint. Pure.

Nothing here does I/O or reads a clock; randomness comes in as a number so tests can replay
any draw. The outbound shell calls ``route`` once per HTTP request or TCP connection with the
``MeshView`` it read at the start, so a route reload never changes a decision half-way.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from meshd.config.schema import DestinationRoutes
from meshd.proxy.view import MeshView
from meshd.registry.model import Endpoint


def choose_subset(dest: DestinationRoutes | None, rand: float) -> str | None:
    """The subset a request goes to, by the destination's weighted split.

    ``rand`` is a uniform draw in ``[0, 1)``. ``None`` means "no split: any healthy instance".
    A leg of weight 0 is never chosen; legs are taken in declaration order, so a draw maps to
    the same leg for the same table.
    """
    if dest is None or not dest.split:
        return None
    total = sum(leg.weight for leg in dest.split)
    if total <= 0:
        return None
    point = rand * total
    cumulative = 0
    for leg in dest.split:
        cumulative += leg.weight
        if point < cumulative:
            return leg.subset
    # rand == 1.0 or float rounding: the last leg that can receive traffic
    return next(leg.subset for leg in reversed(dest.split) if leg.weight > 0)


def candidates(view: MeshView, dest_name: str, subset: str | None) -> tuple[Endpoint, ...]:
    """The healthy endpoints of ``dest_name`` in ``subset`` (all healthy ones when ``None``).

    A subset the route table does not declare has no candidates (validation prevents it; a
    view caught between a routes update and an endpoints update must not send traffic to the
    wrong version)."""
    endpoints = view.endpoint_set(dest_name)
    if endpoints is None:
        return ()
    if subset is None:
        return endpoints.healthy()
    dest = view.routes.get(dest_name)
    declared = dest.subset(subset) if dest is not None else None
    if declared is None:
        return ()
    return endpoints.by_version(declared.version)


class RoundRobin:
    """Round robin over whatever candidate list each call brings, one cursor per key.

    The candidate list may change between calls (endpoints come and go); the cursor keeps
    advancing modulo the current length, which spreads load evenly while the list is stable and
    never fails when it shrinks."""

    def __init__(self) -> None:
        self._cursors: dict[Hashable, int] = {}

    def pick(self, key: Hashable, endpoints: tuple[Endpoint, ...]) -> Endpoint | None:
        if not endpoints:
            return None
        cursor = self._cursors.get(key, 0)
        self._cursors[key] = (cursor + 1) % (1 << 30)
        return endpoints[cursor % len(endpoints)]


@dataclass(frozen=True)
class Decision:
    """Where one request or connection goes. ``endpoint`` is None when nothing can serve it,
    and ``reason`` then says why in words an operator can act on."""

    destination: str
    subset: str | None
    endpoint: Endpoint | None
    timeout: float | None
    reason: str = ""

    @property
    def subset_label(self) -> str:
        return self.subset or ""


def route(view: MeshView, dest_name: str, rand: float, balancer: RoundRobin) -> Decision:
    """Split, then balance: the whole per-request routing decision."""
    dest = view.routes.get(dest_name)
    timeout = dest.timeout if dest is not None else None
    subset = choose_subset(dest, rand)
    pool = candidates(view, dest_name, subset)
    endpoint = balancer.pick((dest_name, subset), pool)
    if endpoint is not None:
        return Decision(dest_name, subset, endpoint, timeout)
    if view.endpoint_set(dest_name) is None:
        reason = f"no endpoints known for {dest_name}"
    elif subset is None:
        reason = f"no healthy endpoint of {dest_name}"
    else:
        reason = f"no healthy endpoint of {dest_name} in subset {subset}"
    return Decision(dest_name, subset, None, timeout, reason)
