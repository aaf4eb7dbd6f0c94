"""Per-subset series over the last minutes, for the console's charts: request rate, success rate
(% non-5xx) and p99 latency of every destination subset as its callers see it (the outbound
side), summed over the hosts that call it.

Each refresh adds one ``Point`` per series: the increase of ``meshd_requests_total`` (by code)
and of the ``meshd_request_duration_seconds`` buckets since the previous scrape of each meshd.
Points keep counts, not ratios, so a chart column or the current value over several points is
exact: a rate is requests over seconds, a success rate errors over requests, a p99 the quantile
of the summed bucket increases. Pure: scrapes in, points out, in bounded ring buffers."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tui.prom import Buckets, MetricSample, bucket_delta, delta_map, merge_buckets, quantile

SPAN = 300.0  # seconds a chart shows
MAX_POINTS = 600  # kept per series: SPAN at a refresh every half second

SeriesKey = tuple[str, str]  # (destination, subset)


def is_error(code: str) -> bool:
    """A 5xx, or a request that got no status at all (an empty or non-numeric code)."""
    return not code.isdigit() or int(code) >= 500


@dataclass(frozen=True)
class Point:
    """What one series gained over one refresh interval ending at ``at``."""

    at: float
    elapsed: float  # seconds
    requests: float = 0.0
    errors: float = 0.0  # 5xx
    latency: Buckets = ()  # increase of each cumulative bucket, ascending, +Inf last


@dataclass(frozen=True)
class Reading:
    """Points summed: the values a chart column or a current-value label shows."""

    elapsed: float
    requests: float
    errors: float
    latency: Buckets

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def success(self) -> float | None:
        """The share of non-5xx responses; None without requests (not 100 %)."""
        return None if self.requests <= 0 else 1.0 - self.errors / self.requests

    @property
    def p99(self) -> float | None:
        return quantile(0.99, self.latency)


def reading(points: Iterable[Point]) -> Reading | None:
    """The points summed (None: no point at all, which is not the same as no traffic)."""
    found = list(points)
    if not found:
        return None
    return Reading(sum(p.elapsed for p in found), sum(p.requests for p in found),
                   sum(p.errors for p in found), merge_buckets(p.latency for p in found))


def increase(new: MetricSample, old: MetricSample
             ) -> dict[SeriesKey, tuple[float, float, Buckets]]:
    """Outbound (requests, 5xx, latency bucket increases) of one meshd between two of its
    scrapes, by (destination, subset), summed over the services on it that call. A counter
    that went down (the meshd restarted) counts from zero."""
    out: dict[SeriesKey, tuple[float, float, Buckets]] = {}
    for (direction, _src, dest, subset, code), n in delta_map(new.requests,
                                                               old.requests).items():
        if direction != "outbound":
            continue
        requests, errors, _ = out.get((dest, subset), (0.0, 0.0, ()))
        out[(dest, subset)] = (requests + n, errors + (n if is_error(code) else 0.0), ())
    for (direction, dest, subset), buckets in new.latency.items():
        if direction != "outbound":
            continue
        requests, errors, _ = out.get((dest, subset), (0.0, 0.0, ()))
        out[(dest, subset)] = (requests, errors,
                               bucket_delta(buckets, old.latency.get((direction, dest, subset))))
    return out


def scaled(buckets: Buckets, factor: float) -> Buckets:
    return tuple((le, count * factor) for le, count in buckets)


@dataclass(frozen=True)
class HostIncrease:
    """One meshd's scrape at this refresh against its previous one, ``elapsed`` seconds apart
    (longer than the refresh interval when it missed refreshes)."""

    elapsed: float
    new: MetricSample
    old: MetricSample


def points_at(at: float, interval: float, hosts: Iterable[HostIncrease]
              ) -> dict[SeriesKey, Point]:
    """One point per series for the refresh interval (``interval`` seconds) ending at ``at``,
    summed over the hosts read at this refresh. A host that missed refreshes contributes its
    average over the gap (its increase times interval/elapsed), not a spike of all of it."""
    totals: dict[SeriesKey, list[tuple[float, float, Buckets]]] = {}
    for host in hosts:
        if host.elapsed <= 0:
            continue
        factor = min(1.0, interval / host.elapsed)
        for key, (requests, errors, latency) in increase(host.new, host.old).items():
            totals.setdefault(key, []).append(
                (requests * factor, errors * factor, scaled(latency, factor)))
    return {key: Point(at, interval, sum(p[0] for p in parts), sum(p[1] for p in parts),
                       merge_buckets(p[2] for p in parts))
            for key, parts in totals.items()}


def columns(points: Sequence[Point], now: float, width: int, span: float = SPAN
            ) -> list[Reading | None]:
    """``width`` columns covering the ``span`` seconds up to ``now``, oldest first, each the
    points whose interval ended in it summed (None: no point there, e.g. before the console
    started or while no meshd calling the destination answered)."""
    if width <= 0:
        return []
    step = span / width
    start = now - span
    slots: list[list[Point]] = [[] for _ in range(width)]
    for point in points:
        if point.at <= start or point.at > now:
            continue
        index = min(width - 1, int((point.at - start - 1e-9) / step))
        slots[index].append(point)
    return [reading(slot) for slot in slots]


def latest(points: Sequence[Point], now: float, window: float) -> Reading | None:
    """The points of the last ``window`` seconds up to ``now`` summed (the current value)."""
    return reading(p for p in points if now - window < p.at <= now)


class SubsetSeries:
    """A bounded ring buffer of points per (destination, subset), fed once per refresh."""

    def __init__(self, max_points: int = MAX_POINTS) -> None:
        self.max_points = max_points
        self.points: dict[SeriesKey, deque[Point]] = {}
        self.last_at: float | None = None

    def add(self, at: float, hosts: Sequence[HostIncrease]) -> None:
        """Take a refresh at ``at``: every series gets a point (no traffic: an empty one), so
        a subset that stops receiving requests shows it. A refresh where no calling meshd
        answered adds nothing: the charts show a gap, not a drop to zero."""
        previous, self.last_at = self.last_at, at
        if previous is None or at <= previous or not hosts:
            return
        interval = at - previous
        found = points_at(at, interval, hosts)
        for key in set(self.points) | set(found):
            ring = self.points.get(key)
            if ring is None:
                ring = self.points[key] = deque(maxlen=self.max_points)
            ring.append(found.get(key) or Point(at, interval))

    def of(self, destination: str) -> dict[str, Sequence[Point]]:
        """The series of ``destination``'s subsets, by subset ("" without a split)."""
        return {subset: ring for (dest, subset), ring in sorted(self.points.items())
                if dest == destination}


def by_subset(series: Mapping[str, Sequence[Point]], subsets: Iterable[str]
              ) -> dict[str, Sequence[Point]]:
    """``series`` for the given subsets in their order (one without points: empty), then any
    other subset the callers reported."""
    out: dict[str, Sequence[Point]] = {name: series.get(name, ()) for name in subsets}
    for name, points in series.items():
        if name not in out and any(p.requests for p in points):
            out[name] = points
    return out
