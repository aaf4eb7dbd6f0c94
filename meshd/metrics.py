"""Prometheus collectors for one meshd, on an explicit registry (never the global one).

Names follow Istio's where they have an equivalent, with the ``meshd_`` prefix; docs/metrics.md
lists every series and maps them to Istio's. No ``_created`` series (they double the series
count and no dashboard reads them); the registry carries the process collector (``process_*``)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# A process-wide switch of prometheus_client: every registry of ours (meshd's, the registry's,
# the CA's) leaves the ``_created`` series out.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)


# the histogram's upper bounds with +Inf: a duration goes in the first bucket whose bound is >= it
LATENCY_BOUNDS = (*LATENCY_BUCKETS, float("inf"))
_LE = tuple(floatToGoString(bound) for bound in LATENCY_BOUNDS)  # type: ignore[no-untyped-call]

_REQUEST_LABELS = ("direction", "source", "destination", "subset", "code", "mtls", "grpc_status")
_DURATION_LABELS = _REQUEST_LABELS[:5]
_BYTES_LABELS = _REQUEST_LABELS[:4]


class RequestSeries:
    """The four request series (``meshd_requests_total``, ``meshd_request_duration_seconds``,
    ``meshd_request_bytes_total``, ``meshd_response_bytes_total``) as plain numbers: one list
    per label set (a count; a duration sum and the per-bucket counts; a byte sum), exposed by
    this collector with the families, samples and values prometheus-client's ``Counter`` and
    ``Histogram`` would give.

    prometheus-client takes a lock per ``inc``/``observe`` (four per request and hop); the
    request path runs in one thread per process, so the lists need none. ``collect`` may run in
    another thread (the admin API renders in one): it copies each dict and row before reading
    it (one step under the GIL each), so new label sets do not disturb it, and a histogram's
    count is its buckets' sum; its sum may hold the one request being counted before its bucket
    does, as with prometheus-client's separate locks."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, ...], list[float]] = {}     # [requests]
        self._durations: dict[tuple[str, ...], list[float]] = {}  # [sum, per-bucket counts...]
        self._sent: dict[tuple[str, ...], list[float]] = {}       # [request body bytes]
        self._received: dict[tuple[str, ...], list[float]] = {}   # [response body bytes]
        self.requests = _Family(self._counts, _REQUEST_LABELS, 1, _CountChild)
        self.duration = _Family(self._durations, _DURATION_LABELS, 1 + len(LATENCY_BOUNDS),
                                _DurationChild)
        self.request_bytes = _Family(self._sent, _BYTES_LABELS, 1, _CountChild)
        self.response_bytes = _Family(self._received, _BYTES_LABELS, 1, _CountChild)

    def rows(self, direction: str, source: str, destination: str, subset: str, code: str,
             mtls: str, grpc_status: str) -> tuple[list[float], list[float], list[float],
                                                  list[float]]:
        """The four rows one request adds to (each made at 0 the first time, as ``labels()``
        does: the byte series exist from a label set's first request)."""
        key = (direction, source, destination, subset, code, mtls, grpc_status)
        return (self.requests.row(key), self.duration.row(key[:5]),
                self.request_bytes.row(key[:4]), self.response_bytes.row(key[:4]))

    def describe(self) -> list[Metric]:
        return self._families(False)

    def collect(self) -> list[Metric]:
        return self._families(True)

    def _families(self, with_samples: bool) -> list[Metric]:
        requests = CounterMetricFamily(
            "meshd_requests", "HTTP requests proxied; mtls: whether the caller was "
            "authenticated by mutual TLS (outbound: always, the mesh hop is mTLS); grpc_status: "
            "the gRPC status of a gRPC call (\"\" otherwise)", labels=_REQUEST_LABELS)
        duration = HistogramMetricFamily(
            "meshd_request_duration_seconds", "HTTP request duration, head to end of response",
            labels=_DURATION_LABELS)
        sent = CounterMetricFamily(
            "meshd_request_bytes", "HTTP request body bytes sent upstream (the last try's)",
            labels=_BYTES_LABELS)
        received = CounterMetricFamily(
            "meshd_response_bytes", "HTTP response body bytes sent to the client",
            labels=_BYTES_LABELS)
        if with_samples:
            for family, rows in ((requests, self._counts), (sent, self._sent),
                                 (received, self._received)):
                for labels, row in rows.copy().items():
                    family.add_metric(labels, row[0])
            for labels, row in self._durations.copy().items():
                row = row[:]
                buckets, total = [], 0.0
                for le, n in zip(_LE, row[1:], strict=True):
                    total += n
                    buckets.append((le, total))
                duration.add_metric(labels, buckets, row[0])
        return [requests, duration, sent, received]


_Child = TypeVar("_Child", "_CountChild", "_DurationChild")


class _Family(Generic[_Child]):
    """``labels(...)`` of one request series, as on a prometheus-client metric: for code that
    counts outside ``Metrics.request_done`` (``bad_request``)."""

    def __init__(self, rows: dict[tuple[str, ...], list[float]], labelnames: Sequence[str],
                 width: int, child: Callable[[list[float]], _Child]) -> None:
        self._rows = rows
        self._labelnames = tuple(labelnames)
        self._width = width
        self._child: Callable[[list[float]], _Child] = child

    def row(self, key: tuple[str, ...]) -> list[float]:
        row = self._rows.get(key)
        if row is None:
            row = self._rows.setdefault(key, [0.0] * self._width)
        return row

    def labels(self, *values: object, **named: object) -> _Child:
        if named:
            if values or set(named) != set(self._labelnames):
                raise ValueError(f"labels: expected {', '.join(self._labelnames)}")
            values = tuple(named[name] for name in self._labelnames)
        if len(values) != len(self._labelnames):
            raise ValueError(f"labels: expected {len(self._labelnames)} values "
                             f"({', '.join(self._labelnames)}), got {len(values)}")
        return self._child(self.row(tuple(str(value) for value in values)))


class _CountChild:
    def __init__(self, row: list[float]) -> None:
        self._row = row

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self._row[0] += amount


class _DurationChild:
    def __init__(self, row: list[float]) -> None:
        self._row = row

    def observe(self, amount: float) -> None:
        self._row[0] += amount
        self._row[bisect_left(LATENCY_BOUNDS, amount) + 1] += 1


def new_registry() -> CollectorRegistry:
    """An explicit registry with this process's ``process_*`` series (CPU, memory, open files,
    start time: read from /proc, so empty elsewhere)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


# request_done's cache key: direction, source, destination, subset, status, mtls, grpc_status
_RequestKey = tuple[str, str, str, str, int, bool, str]


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = new_registry()
        self._request_rows: dict[_RequestKey, tuple[list[float], ...]] = {}
        r = self.registry
        # the four request series: plain numbers behind one collector (see RequestSeries)
        self.request_series = RequestSeries()
        r.register(self.request_series)
        self.requests = self.request_series.requests
        self.request_duration = self.request_series.duration
        self.request_bytes = self.request_series.request_bytes
        self.response_bytes = self.request_series.response_bytes
        self.tcp_connections = Counter(
            "meshd_tcp_connections_opened", "TCP connections proxied",
            ["direction", "source", "destination", "subset"], registry=r)
        self.tcp_bytes = Counter(
            "meshd_tcp_bytes", "bytes proxied",
            ["direction", "destination", "flow"], registry=r)
        self.connection_errors = Counter(
            "meshd_connection_errors", "connections refused or failed",
            ["direction", "reason"], registry=r)
        self.config_generation = Gauge(
            "meshd_config_generation", "route table generation in force", registry=r)
        self.config_reloads = Counter(
            "meshd_config_reloads", "route table updates", ["result"], registry=r)
        self.config_refused = Counter(
            "meshd_config_refused", "route tables refused (the one in force stays), by reason: "
            "missing, empty, invalid, unsigned, unknown_signer, revoked, bad_signature, "
            "replay, from_the_future...", ["reason"], registry=r)
        self.registry_staleness = Gauge(
            "meshd_registry_staleness_seconds",
            "how out of date the oldest view from the registry may be: seconds since it was "
            "last known current (0 while the registry answers)", registry=r)
        self.registry_stale = Gauge(
            "meshd_registry_stale", "1 while a view in force may be out of date (registry "
            "unreachable or not answering, or serving the last known state from disk)",
            registry=r)
        self.endpoints = Gauge(
            "meshd_endpoints", "known endpoints by destination and health",
            ["destination", "version", "healthy"], registry=r)
        self.cert_expiry = Gauge(
            "meshd_cert_expiry_timestamp_seconds", "leaf certificate notAfter (unix time)",
            ["service"], registry=r)
        self.node_cert_expiry = Gauge(
            "meshd_node_cert_expiry_timestamp_seconds",
            "node certificate notAfter (unix time): what the host renews with", registry=r)
        self.cert_renewals = Counter(
            "meshd_cert_renewals", "certificate renewals (node and services together)",
            ["result"], registry=r)
        self.cert_renewal_failures = Gauge(
            "meshd_cert_renewal_failures", "renewal attempts failed in a row (0 when the last "
            "one succeeded)", registry=r)
        self.denied_serials = Gauge(
            "meshd_denylist_serials", "revoked certificate serials in force", registry=r)
        self.trust_roots = Gauge(
            "meshd_trust_roots", "roots in the trust bundle (2 during a root rotation)",
            registry=r)
        self.inbound_connections = Counter(
            "meshd_inbound_connections", "inbound connections accepted, by local service and "
            "whether they were mutual TLS (mtls=\"false\": plaintext on a permissive service)",
            ["destination", "mtls"], registry=r)
        self.connections_refused = Counter(
            "meshd_connections_refused", "connections closed at accept because a cap was "
            "reached: listener_limit (max_connections), source_limit "
            "(max_connections_per_source), process_limit (what the open file limit allows)",
            ["listener", "reason"], registry=r)
        self.connections_open = Gauge(
            "meshd_connections_open", "accepted connections open now, by listener",
            ["listener"], registry=r)
        self.local_health = Gauge(
            "meshd_local_service_healthy", "1 when the local app passes its health check",
            ["service"], registry=r)

        # resilience (outbound, client side)
        self.retries = Counter(
            "meshd_retries", "outbound requests tried again, by what the failed try got",
            ["destination", "reason"], registry=r)
        self.failovers = Counter(
            "meshd_failovers", "outbound requests served by a failover subset of the one drawn "
            "(it had no healthy, admitted endpoint left)", ["destination", "subset", "to"],
            registry=r)
        self.retry_budget_exhausted = Counter(
            "meshd_retry_budget_exhausted",
            "retries not made because the destination's retry budget was spent",
            ["destination"], registry=r)
        self.ejections = Counter(
            "meshd_outlier_ejections", "endpoints ejected by outlier detection",
            ["destination", "reason"], registry=r)
        self.circuit_breaker_rejections = Counter(
            "meshd_circuit_breaker_rejections",
            "requests answered 503 at once: connection and pending-request limits reached",
            ["destination"], registry=r)
        self.faults_injected = Counter(
            "meshd_faults_injected", "requests delayed or aborted by fault injection",
            ["destination", "route", "kind"], registry=r)
        self.rate_limited = Counter(
            "meshd_rate_limited", "requests answered 429 by a route's local rate limit",
            ["destination", "route"], registry=r)
        self.mirrored = Counter(
            "meshd_mirror_requests", "copies of requests sent to a mirror subset",
            ["destination", "subset", "result"], registry=r)

        # inbound authorization
        self.authz_denied = Counter(
            "meshd_authz_denied", "requests (and TCP connections) refused by a destination's "
            "authorization rules; rule=\"default deny\" when no rule applied",
            ["destination", "source", "rule"], registry=r)

        # the outcomes a dashboard plots exist from the start, at 0 (not only once they happen)
        for result in ("ok", "failed"):
            self.cert_renewals.labels(result)
        for result in ("applied", "rejected"):
            self.config_reloads.labels(result)

        # tracing (meshd.tracing): spans exported over OTLP, or dropped rather than waited for
        self.trace_spans_exported = Counter(
            "meshd_trace_spans_exported", "spans accepted by the OTLP endpoint", registry=r)
        self.trace_spans_dropped = Counter(
            "meshd_trace_spans_dropped", "sampled spans not exported: queue_full (the export "
            "queue was at its bound), export_failed (their batch's export failed)",
            ["reason"], registry=r)
        self.trace_export_failures = Counter(
            "meshd_trace_export_failures", "OTLP export requests that failed (no answer in "
            "time, refused, or not 2xx)", registry=r)
        for reason in ("queue_full", "export_failed"):
            self.trace_spans_dropped.labels(reason)
        # the egress proxy listener (HTTP_PROXY / HTTPS_PROXY for local apps)
        # worker processes (``workers`` in meshd.toml; absent with one process)
        self.workers = Gauge(
            "meshd_workers", "data-plane worker processes this meshd runs (1: the one process "
            "serves)", registry=r)
        self.worker_restarts = Counter(
            "meshd_worker_restarts", "worker processes started again after ending unbidden",
            registry=r)
        self.worker_families: Callable[[], list[list[Metric]]] | None = None
        self.egress_requests = Counter(
            "meshd_egress_requests", "requests (kind=\"http\") and CONNECT tunnels "
            "(kind=\"connect\") to the egress proxy listener, by verdict: external (a "
            "declared external destination, named), passthrough (undeclared, egress = "
            "\"allow-any\"), denied", ["kind", "verdict", "destination"], registry=r)

    def request_done(self, direction: str, source: str, destination: str, subset: str,
                     status: int, seconds: float, *, mtls: bool = True, grpc_status: str = "",
                     request_bytes: int = 0, response_bytes: int = 0) -> None:
        """Count one proxied HTTP request, observe its duration and add its body bytes. The
        rows of the four series are kept per label set, so a request adds to four lists:
        this is on every request's path, per hop."""
        key = (direction, source, destination, subset, status, mtls, grpc_status)
        rows = self._request_rows.get(key)
        if rows is None:
            rows = self.request_series.rows(direction, source, destination, subset, str(status),
                                            "true" if mtls else "false", grpc_status)
            self._request_rows[key] = rows
        count, duration, sent, received = rows
        count[0] += 1
        duration[0] += seconds
        duration[bisect_left(LATENCY_BOUNDS, seconds) + 1] += 1
        if request_bytes:
            sent[0] += request_bytes
        if response_bytes:
            received[0] += response_bytes

    def bad_request(self, direction: str, source: str, destination: str, status: int, *,
                    mtls: bool = True) -> None:
        """Count a request refused before it could be routed (malformed: no subset, no
        duration)."""
        self.requests.labels(direction, source, destination, "", str(status),
                             "true" if mtls else "false", "").inc()

    def render(self) -> bytes:
        """The exposition: this process's series, and with worker processes
        (``worker_families``), theirs merged in (``meshd.workers.plan.merge_families``)."""
        if self.worker_families is None:
            return generate_latest(self.registry)
        return generate_latest(_Merged(self.registry, self.worker_families()))


# gauges the worker processes set, summed over them (the others are the supervisor's)
WORKER_GAUGES = frozenset({"meshd_connections_open"})


class _Merged:
    """A registry-like view: the supervisor's families with its workers' merged in."""

    def __init__(self, registry: CollectorRegistry, workers: list[list[Metric]]) -> None:
        self._registry = registry
        self._workers = workers

    def collect(self) -> list[Metric]:
        from meshd.workers.plan import merge_families

        return merge_families(self._registry.collect(), self._workers, WORKER_GAUGES)
