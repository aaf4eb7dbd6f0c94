"""The few meshd series the console reads from a meshd's ``/metrics``, parsed into plain values,
and the arithmetic on them (deltas between two scrapes, a quantile from histogram buckets). Pure:
text in, numbers out."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

K = TypeVar("K")

# (direction, source, destination, subset, code)
RequestKey = tuple[str, str, str, str, str]
# (direction, destination, subset)
LatencyKey = tuple[str, str, str]
# cumulative counts by upper bound, ascending, +Inf last
Buckets = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class MetricSample:
    """One scrape of one meshd, reduced to what the console shows."""

    requests: Mapping[RequestKey, float] = field(default_factory=dict)
    latency: Mapping[LatencyKey, Buckets] = field(default_factory=dict)
    tcp_opened: Mapping[tuple[str, str, str, str], float] = field(default_factory=dict)
    reloads: Mapping[str, float] = field(default_factory=dict)
    ejections: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (dest, reason)


def parse_metrics(text: str) -> MetricSample:
    """Parse Prometheus text exposition; series the console does not use are skipped."""
    requests: dict[RequestKey, float] = {}
    buckets: dict[LatencyKey, dict[float, float]] = {}
    tcp: dict[tuple[str, str, str, str], float] = {}
    reloads: dict[str, float] = {}
    ejections: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == "meshd_requests_total":
                key = (labels.get("direction", ""), labels.get("source", ""),
                       labels.get("destination", ""), labels.get("subset", ""),
                       labels.get("code", ""))
                requests[key] = requests.get(key, 0.0) + value
            elif name == "meshd_request_duration_seconds_bucket":
                lkey = (labels.get("direction", ""), labels.get("destination", ""),
                        labels.get("subset", ""))
                le = float(labels.get("le", "+Inf"))
                per_le = buckets.setdefault(lkey, {})  # summed over source and code
                per_le[le] = per_le.get(le, 0.0) + value
            elif name == "meshd_tcp_connections_opened_total":
                tkey = (labels.get("direction", ""), labels.get("source", ""),
                        labels.get("destination", ""), labels.get("subset", ""))
                tcp[tkey] = value
            elif name == "meshd_config_reloads_total":
                reloads[labels.get("result", "")] = value
            elif name == "meshd_outlier_ejections_total":
                ejections[(labels.get("destination", ""), labels.get("reason", ""))] = value
    latency = {k: tuple(sorted(v.items())) for k, v in buckets.items()}
    return MetricSample(requests, latency, tcp, reloads, ejections)


def counter_delta(new: float, old: float | None) -> float:
    """The increase of a counter between two scrapes; a reset (a restarted meshd) counts from 0."""
    if old is None:
        return new
    return new - old if new >= old else new


def delta_map(new: Mapping[K, float], old: Mapping[K, float]) -> dict[K, float]:
    return {k: counter_delta(v, old.get(k)) for k, v in new.items()}


def bucket_delta(new: Buckets, old: Buckets | None) -> Buckets:
    if not old:
        return new
    previous = dict(old)
    if any(count < previous.get(le, 0.0) for le, count in new):
        return new  # reset
    return tuple((le, count - previous.get(le, 0.0)) for le, count in new)


def merge_buckets(parts: Iterable[Buckets]) -> Buckets:
    total: dict[float, float] = {}
    for part in parts:
        for le, count in part:
            total[le] = total.get(le, 0.0) + count
    return tuple(sorted(total.items()))


def quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated linearly inside the bucket it
    falls in (as PromQL's ``histogram_quantile``); None without observations. A quantile in
    the +Inf bucket is reported as the largest finite bound."""
    if not buckets:
        return None
    count = buckets[-1][1]
    if count <= 0:
        return None
    rank = q * count
    lower_bound, lower_count = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(le):
                return lower_bound
            if cumulative == lower_count:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (
                cumulative - lower_count)
        lower_bound, lower_count = le, cumulative
    return lower_bound
