"""Which instances may serve a request: route, then subset by weighted split, then the healthy
endpoints of that subset. Pure.

Nothing here does I/O or reads a clock; randomness comes in as a number so tests can replay
any draw. The outbound shell calls ``plan`` once per HTTP request or TCP connection with the
``MeshView`` it read at the start, so a route reload never changes a decision half-way; the
endpoint is then picked among ``RoutePlan.candidates`` by the destination's balancer, minus
ejected endpoints (``meshd.proxy.core.outlier.admitted``). ``meshd explain`` calls the same
functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshd.config.schema import Route, SplitLeg
from meshd.proxy.core.balancer import RoundRobin
from meshd.proxy.core.matcher import RequestFacts, select_route
from meshd.proxy.core.view import MeshView
from meshd.registry.model import Endpoint

__all__ = ["RoundRobin", "RoutePlan", "candidates", "choose_subset", "plan"]


def choose_subset(split: Sequence[SplitLeg] | None, rand: float) -> str | None:
    """The subset a request goes to, by a weighted split.

    ``rand`` is a uniform draw in ``[0, 1)``. ``None`` means "no split: any healthy instance".
    A leg of weight 0 is never chosen; legs are taken in declaration order, so a draw maps to
    the same leg for the same table.
    """
    if not split:
        return None
    total = sum(leg.weight for leg in split)
    if total <= 0:
        return None
    point = rand * total
    cumulative = 0
    for leg in split:
        cumulative += leg.weight
        if point < cumulative:
            return leg.subset
    # rand == 1.0 or float rounding: the last leg that can receive traffic
    return next(leg.subset for leg in reversed(split) if leg.weight > 0)


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


def no_endpoint_reason(view: MeshView, dest_name: str, subset: str | None) -> str:
    """Why ``candidates`` came back empty, in words an operator can act on."""
    if view.endpoint_set(dest_name) is None:
        return f"no endpoints known for {dest_name}"
    if subset is None:
        return f"no healthy endpoint of {dest_name}"
    return f"no healthy endpoint of {dest_name} in subset {subset}"


@dataclass(frozen=True)
class RoutePlan:
    """The route a request took, the subset it drew and the endpoints that may serve it."""

    destination: str
    route: Route | None  # None: the destination has no routing (any healthy instance)
    subset: str | None
    candidates: tuple[Endpoint, ...]

    @property
    def route_name(self) -> str:
        return self.route.name if self.route is not None else ""

    @property
    def timeout(self) -> float | None:
        return self.route.timeout if self.route is not None else None


def plan(view: MeshView, dest_name: str, facts: RequestFacts | None,
         rand: float) -> RoutePlan:
    """Route (``facts`` None: the default route, as for TCP), split, candidates."""
    dest = view.routes.get(dest_name)
    if dest is None:
        route = None
    elif facts is None or not dest.routes:
        route = dest.default_route
    else:
        route = select_route(dest, facts)
    subset = choose_subset(route.split if route is not None else None, rand)
    return RoutePlan(dest_name, route, subset, candidates(view, dest_name, subset))
