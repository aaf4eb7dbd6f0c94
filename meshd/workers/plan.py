"""What the worker processes share and how their views are merged. Pure.

A host's meshd with ``workers = N`` (N > 1) is one supervisor and N worker processes. The
supervisor owns the identities, the registry (watches, registration, health checks), the admin
API and the listening sockets; each worker runs the proxy on the same accept sockets (the
kernel hands each new connection to whichever worker accepts first, so an idle worker takes
more). Policy state is either split, shared or kept per worker:

- split: the limits a host promises never to exceed. Circuit-breaker limits
  (``max_connections``, ``max_pending_requests``), a route's rate limit (``requests_per_second``,
  ``burst``) and a retry budget's floor (``min_retries_per_second``): each worker enforces
  ``share(limit, N)``, so the host as a whole stays within what the route table says (within
  rounding up: never less than one each).
- shared: outlier ejections. A worker detects from its own traffic; the ejection it decides is
  announced to the supervisor, which puts it in force in every worker (Envoy's model: the
  decision is central, the counting local). Endpoint health (the supervisor's checks and the
  registry's view) is the supervisor's and reaches every worker with the endpoints.
- per worker: a retry budget's ratio (a ratio of each worker's requests is the same ratio of
  the host's), balancer cursors and least-request counts, connection pools, the mirror queue,
  external destinations' name lookups, trace exporters and access-log lines (one line per
  write, so lines from several workers never interleave mid-line).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client.metrics_core import Metric

from meshd.errors import ConfigError, Problem

AUTO_CAP = 8  # ``workers = "auto"``: at most this many, however many cores
WORKERS_ENV = "MESHD_WORKERS"


def worker_count(configured: int | None, environ: Mapping[str, str], cores: int) -> int:
    """How many worker processes: ``MESHD_WORKERS`` when set (a number or ``auto``), else
    ``workers`` from meshd.toml (None: ``auto``); ``auto`` is the usable cores, capped at
    ``AUTO_CAP``. 1 means no workers: the one process serves (the supervisor does not split).
    A malformed ``MESHD_WORKERS`` is a ``ConfigError`` (never silently another count)."""
    raw = environ.get(WORKERS_ENV, "").strip()
    if raw:
        if raw == "auto":
            configured = None
        elif raw.isdigit() and 1 <= int(raw) <= 64:
            configured = int(raw)
        else:
            raise ConfigError([Problem(WORKERS_ENV, "", f"expected \"auto\" or a number of "
                                       f"worker processes from 1 to 64, got {raw!r}")])
    if configured is not None:
        return configured
    return max(1, min(cores, AUTO_CAP))


def share(limit: int | None, workers: int) -> int | None:
    """One worker's part of a host-wide limit (None: no limit): rounded up, at least 1."""
    if limit is None or workers <= 1:
        return limit
    return max(1, math.ceil(limit / workers))


def share_rate(rate: float, workers: int) -> float:
    """One worker's part of a host-wide rate."""
    return rate / workers if workers > 1 else rate


# -- /metrics: the host's series from every process ---------------------------------------------

# process_* series summed over the processes (the host's meshd as a whole); the others
# (start time, fd limit) are the supervisor's own
SUMMED_PROCESS = frozenset({"process_cpu_seconds", "process_resident_memory_bytes",
                            "process_virtual_memory_bytes", "process_open_fds"})


def merge_families(own: Iterable[Metric], workers: Sequence[Iterable[Metric]],
                   worker_gauges: frozenset[str]) -> list[Metric]:
    """The supervisor's families with the workers' added in. Counters, histograms and summaries
    are summed sample by sample (same name and labels); gauges are summed only when the workers
    own them (``worker_gauges``, e.g. open connections) or they are a summed ``process_*``
    series; other gauges are the supervisor's (it sets them: certificates, the registry)."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    order: dict[str, list[tuple[str, tuple[tuple[str, str], ...]]]] = {}

    def add(family: Metric, from_worker: bool) -> None:
        if from_worker and family.type == "gauge" and family.name not in worker_gauges \
                and family.name not in SUMMED_PROCESS:
            return
        if from_worker and family.type not in ("counter", "histogram", "summary", "gauge"):
            return
        if family.name not in merged:
            merged[family.name] = Metric(family.name, family.documentation, family.type,
                                         family.unit)
            values[family.name] = {}
            order[family.name] = []
        if from_worker and family.name.startswith("process_") \
                and family.name not in SUMMED_PROCESS:
            return
        found, seen = values[family.name], order[family.name]
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if key not in found:
                found[key] = 0.0
                seen.append(key)
            found[key] += sample.value

    for family in own:
        add(family, False)
    for families in workers:
        for family in families:
            add(family, True)
    out = []
    for name, family in merged.items():
        for sample_name, labels in order[name]:
            family.add_sample(sample_name, dict(labels), values[name][(sample_name, labels)])
        out.append(family)
    return out


# -- /v1/state: the host's proxy state from every worker --------------------------------------

def merge_open(parts: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """Accepted connections open, by listener kind, over the workers."""
    total: dict[str, int] = {}
    for part in parts:
        for kind, n in part.items():
            total[kind] = total.get(kind, 0) + n
    return total


def merge_endpoint_states(parts: Sequence[Mapping[str, Sequence[Mapping[str, Any]]]]
                          ) -> dict[str, list[dict[str, Any]]]:
    """Per destination, each endpoint's state over the workers: requests in flight summed;
    ejected if a worker has it ejected (ejections are shared, so they agree but for the
    moment one is announced), with the longest time left and the most ejections."""
    merged: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for part in parts:
        for destination, endpoints in part.items():
            into = merged.setdefault(destination, {})
            for endpoint in endpoints:
                key = (str(endpoint.get("node", "")), str(endpoint.get("instance_id", "")))
                have = into.get(key)
                if have is None:
                    into[key] = dict(endpoint)
                    continue
                have["active_requests"] = (int(have.get("active_requests", 0))
                                           + int(endpoint.get("active_requests", 0)))
                if endpoint.get("ejected") and (
                        not have.get("ejected") or endpoint.get("ejection_remaining_seconds", 0)
                        > have.get("ejection_remaining_seconds", 0)):
                    for field in ("ejected", "ejection_remaining_seconds", "ejection_reason"):
                        have[field] = endpoint.get(field)
                have["ejections"] = max(int(have.get("ejections", 0)),
                                        int(endpoint.get("ejections", 0)))
    return {dest: list(found.values()) for dest, found in merged.items()}
