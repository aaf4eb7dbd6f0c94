"""Which instances may serve a request: route, then subset by weighted split, then the healthy
endpoints of that subset, in tiers of priority (failover subsets, locality). Pure.

Nothing here does I/O or reads a clock; randomness comes in as a number so tests can replay
any draw. The outbound shell calls ``plan`` once per HTTP request or TCP connection with the
``MeshView`` it read at the start, so a route reload never changes a decision half-way; the
endpoint is then picked by the destination's balancer among the endpoints ``usable`` returns
for the plan's tiers (minus ejected and already tried endpoints). ``meshd explain`` calls the
same functions.

Tiers, highest priority first:

    drawn subset  ── locality rank 0, 1, ... ──┐  (rank: how many of the policy's ``locality``
    failover[0]   ── locality rank 0, 1, ... ──┤   labels, most significant first, the endpoint's
    failover[1]   ── ...                       ┘   host does NOT share with this host)

A try takes the first tier with an endpoint that is neither ejected nor tried by this request;
failing that (a retry that has tried every admitted endpoint), one it has not tried though
ejected; then one not ejected (tried again); failing that, ejection is ignored (panic). So a
subset whose endpoints are all unhealthy or ejected fails over to the next subset in its
declared order, a zone without a healthy endpoint to the other zones, and a retry that has
tried every endpoint of its subset moves on into the failover subsets.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from meshd.config.schema import Route, SplitLeg, Subset
from meshd.proxy.core.balancer import RoundRobin
from meshd.proxy.core.matcher import RequestFacts, select_route
from meshd.proxy.core.view import MeshView
from meshd.registry.model import Endpoint

__all__ = ["RoundRobin", "RoutePlan", "Tier", "candidates", "choose_subset", "plan", "tiers",
           "usable"]

Labels = tuple[tuple[str, str], ...]


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
    """Why ``candidates`` (and every failover subset's) came back empty, in words an operator
    can act on."""
    dest = view.routes.get(dest_name)
    if dest is not None and dest.external is not None:
        names = ", ".join(dest.external.hosts)
        return f"external {dest_name}: {names} not resolved (yet)" if names else \
            f"external {dest_name}: no address"
    if view.endpoint_set(dest_name) is None:
        return f"no endpoints known for {dest_name}"
    if subset is None:
        return f"no healthy endpoint of {dest_name}"
    failover = [name for name in failover_chain(view, dest_name, subset)[1:] if name]
    tail = f" nor in its failover {', '.join(failover)}" if failover else ""
    return f"no healthy endpoint of {dest_name} in subset {subset}{tail}"


def failover_chain(view: MeshView, dest_name: str, subset: str | None) -> tuple[str | None, ...]:
    """``subset``, then the subsets it fails over to, in order."""
    dest = view.routes.get(dest_name)
    declared = dest.subset(subset) if dest is not None and subset is not None else None
    return (subset, *declared.failover) if declared is not None else (subset,)


def locality_rank(here: Labels, endpoint: Endpoint, keys: Sequence[str]) -> int:
    """How many of the locality ``keys`` (most significant first) the endpoint's host does not
    share with this host (``here``): 0 for the same zone, ``len(keys)`` for nothing shared.
    Comparison stops at the first label that differs (or that this host lacks), as a zone in
    another region is not near."""
    mine = dict(here)
    shared = 0
    for key in keys:
        value = mine.get(key)
        if value is None or endpoint.label(key) != value:
            break
        shared += 1
    return len(keys) - shared


class Tier(NamedTuple):
    """Endpoints of one priority: healthy ones of ``subset`` (None: no split) whose hosts are
    at locality ``rank`` from this one. ``failover``: the subset is not the one drawn. (A named
    tuple: made for every request, and a frozen dataclass costs a microsecond more.)"""

    subset: str | None
    rank: int
    endpoints: tuple[Endpoint, ...]
    failover: bool = False


def tiers(view: MeshView, dest_name: str, subset: str | None, here: Labels = ()
          ) -> tuple[Tier, ...]:
    """The non-empty tiers of a request to ``subset`` (module doc), highest priority first."""
    endpoints = view.endpoint_set(dest_name)
    if endpoints is None:
        return ()
    dest = view.routes.get(dest_name)
    if subset is None:
        chain: tuple[Subset, ...] | None = None
    else:
        declared = dest.subset(subset) if dest is not None else None
        if declared is None:
            return ()  # undeclared: no candidates (``candidates``)
        chain = (declared,) if not declared.failover or dest is None else (
            declared, *(s for name in declared.failover if (s := dest.subset(name))))
    keys = dest.policy.locality if dest is not None else ()
    if chain is None:
        found = endpoints.healthy()
        return _ranked(None, found, False, here, keys) if found else ()
    out: list[Tier] = []
    for i, member in enumerate(chain):
        found = endpoints.by_version(member.version)
        if found:
            out += _ranked(member.name, found, i > 0, here, keys)
    return tuple(out)


def _ranked(subset: str | None, found: tuple[Endpoint, ...], failover: bool, here: Labels,
            keys: Sequence[str]) -> tuple[Tier, ...]:
    """``found`` in tiers by locality rank (one tier without ``keys``)."""
    if not keys:
        return (Tier(subset, 0, found, failover),)
    ranked: dict[int, list[Endpoint]] = {}
    for endpoint in found:
        ranked.setdefault(locality_rank(here, endpoint, keys), []).append(endpoint)
    return tuple(Tier(subset, rank, tuple(ranked[rank]), failover) for rank in sorted(ranked))


def usable(found: Sequence[Tier], ejected: Collection[Hashable], avoid: Collection[str] = ()
           ) -> tuple[Tier | None, tuple[Endpoint, ...], bool]:
    """The tier a try goes to and the endpoints of it the balancer picks from (by
    ``Endpoint.key``: ``ejected`` by outlier detection, ``avoid`` already tried by this
    request), and whether it is a panic (ejection ignored). In order: the first tier with an
    endpoint neither ejected nor tried; for a retry, the first with one not tried, ejected or
    not (an ejection is an older guess than the failure this request just met), then the
    first with one not ejected (tried again); else the first tier, ejection ignored."""
    if not ejected and not avoid:  # a first try with nothing ejected: most requests
        for tier in found:
            if tier.endpoints:
                return tier, tier.endpoints, False
    for tier in found:
        pool = tuple(e for e in tier.endpoints if e.key not in ejected and e.key not in avoid)
        if pool:
            return tier, pool, False
    if avoid:
        for tier in found:
            pool = tuple(e for e in tier.endpoints if e.key not in avoid)
            if pool:
                return tier, pool, True
        for tier in found:
            pool = tuple(e for e in tier.endpoints if e.key not in ejected)
            if pool:
                return tier, pool, False
    if not found:
        return None, (), False
    return found[0], found[0].endpoints, True


def fresh_left(found: Sequence[Tier], ejected: Collection[Hashable],
               avoid: Collection[str]) -> bool:
    """Whether an endpoint neither ejected nor tried by this request is left in any tier."""
    return any(e.key not in ejected and e.key not in avoid
               for tier in found for e in tier.endpoints)


@dataclass(frozen=True)
class RoutePlan:
    """The route a request took, the subset it drew and the endpoints that may serve it
    (``candidates``: every endpoint of every tier, in tier order)."""

    destination: str
    route: Route | None  # None: the destination has no routing (any healthy instance)
    subset: str | None
    candidates: tuple[Endpoint, ...]
    tiers: tuple[Tier, ...] = ()

    @property
    def route_name(self) -> str:
        return self.route.name if self.route is not None else ""

    @property
    def timeout(self) -> float | None:
        return self.route.timeout if self.route is not None else None


def plan(view: MeshView, dest_name: str, facts: RequestFacts | None,
         rand: float, here: Labels = ()) -> RoutePlan:
    """Route (``facts`` None: the default route, as for TCP), split, tiers (``here``: this
    host's labels, for locality)."""
    dest = view.routes.get(dest_name)
    if dest is None:
        route = None
    elif facts is None or not dest.routes:
        route = dest.default_route
    else:
        route = select_route(dest, facts)
    subset = choose_subset(route.split if route is not None else None, rand)
    found = tiers(view, dest_name, subset, here)
    everyone = found[0].endpoints if len(found) == 1 else tuple(
        e for tier in found for e in tier.endpoints)
    return RoutePlan(dest_name, route, subset, everyone, found)
