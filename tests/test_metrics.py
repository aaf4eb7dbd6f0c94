"""meshd's four request series kept as plain numbers (``meshd.metrics.RequestSeries``): the same
exposition, byte for byte, as prometheus-client's own ``Counter``/``Histogram`` children for the
same requests; families that pickle (worker processes send them to the supervisor) and merge."""

from __future__ import annotations

import pickle
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from meshd.metrics import LATENCY_BUCKETS, WORKER_GAUGES, Metrics
from meshd.workers.plan import merge_families

_REQUEST_NAMES = ("meshd_requests", "meshd_request_duration_seconds", "meshd_request_bytes",
                  "meshd_response_bytes")


class _ClientRequestMetrics:
    """The request series as meshd counted them before: prometheus-client metrics, children
    looked up with ``labels()``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "meshd_requests", "HTTP requests proxied; mtls: whether the caller was "
            "authenticated by mutual TLS (outbound: always, the mesh hop is mTLS); grpc_status: "
            "the gRPC status of a gRPC call (\"\" otherwise)",
            ["direction", "source", "destination", "subset", "code", "mtls", "grpc_status"],
            registry=r)
        self.request_duration = Histogram(
            "meshd_request_duration_seconds", "HTTP request duration, head to end of response",
            ["direction", "source", "destination", "subset", "code"], buckets=LATENCY_BUCKETS,
            registry=r)
        self.request_bytes = Counter(
            "meshd_request_bytes", "HTTP request body bytes sent upstream (the last try's)",
            ["direction", "source", "destination", "subset"], registry=r)
        self.response_bytes = Counter(
            "meshd_response_bytes", "HTTP response body bytes sent to the client",
            ["direction", "source", "destination", "subset"], registry=r)

    def request_done(self, direction: str, source: str, destination: str, subset: str,
                     status: int, seconds: float, *, mtls: bool = True, grpc_status: str = "",
                     request_bytes: int = 0, response_bytes: int = 0) -> None:
        code = str(status)
        self.requests.labels(direction, source, destination, subset, code,
                             "true" if mtls else "false", grpc_status).inc()
        self.request_duration.labels(direction, source, destination, subset, code
                                     ).observe(seconds)
        sent = self.request_bytes.labels(direction, source, destination, subset)
        received = self.response_bytes.labels(direction, source, destination, subset)
        if request_bytes:
            sent.inc(request_bytes)
        if response_bytes:
            received.inc(response_bytes)

    def bad_request(self, direction: str, source: str, destination: str, status: int, *,
                    mtls: bool = True) -> None:
        self.requests.labels(direction, source, destination, "", str(status),
                             "true" if mtls else "false", "").inc()


def _traffic(m: Metrics | _ClientRequestMetrics, part: int = 0, parts: int = 1) -> None:
    """Requests over several label sets, every bucket bound exactly, beyond the last bound, 0 s,
    no body and large bodies, refused requests between them (every ``parts``-th call from the
    ``part``-th: the same traffic split over worker processes)."""
    calls = []
    durations = [0.0, *LATENCY_BUCKETS, 0.0004, 0.0031, 0.07, 45.0, 1e-9, 0.123456789]
    for i, seconds in enumerate(durations * 3):
        direction = ("outbound", "inbound")[i % 2]
        subset = ("v1", "v2", "")[i % 3]
        status = (200, 503, 404, 200, 200)[i % 5]
        calls.append((direction, "web", "payments", subset, status, seconds,
                      i % 4 == 0, "14" if i % 7 == 0 else "", (i * 977) % 3 * 10_000,
                      (i * 31) % 5 * 2**33))
    for i, call in enumerate(calls):
        if i % parts != part:
            continue
        direction, source, destination, subset, status, seconds, plain, grpc, sent, got = call
        m.request_done(direction, source, destination, subset, status, seconds,
                       mtls=not plain, grpc_status=grpc, request_bytes=sent,
                       response_bytes=got)
        if i % 6 == 0:
            m.bad_request(direction, "unknown", destination, 400, mtls=i % 12 == 0)


def _request_exposition(m: Metrics) -> bytes:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(m.request_series)
    return generate_latest(registry)


def test_the_exposition_is_byte_for_byte_the_prometheus_client_one() -> None:
    new, old = Metrics(), _ClientRequestMetrics()
    assert _request_exposition(new) == generate_latest(old.registry)  # no requests yet
    _traffic(new)
    _traffic(old)
    expected = generate_latest(old.registry)
    assert b"_created" not in expected and expected.count(b"\n") > 200
    assert _request_exposition(new) == expected
    # the four families sit in /metrics where meshd's own metrics put them, unchanged
    assert expected in new.render()


def test_direct_use_of_the_series_counts_like_prometheus_client() -> None:
    new, old = Metrics(), _ClientRequestMetrics()
    for m in (new, old):
        m.requests.labels("inbound", "web", "payments", "v1", "200", "true", "").inc(2)
        m.requests.labels(direction="inbound", source="web", destination="payments",
                          subset="v1", code="200", mtls="true", grpc_status="").inc()
        m.request_duration.labels("inbound", "web", "payments", "v1", 200).observe(0.002)
        m.request_bytes.labels("inbound", "web", "payments", "v1").inc(10)
        m.response_bytes.labels("inbound", "web", "payments", "v1").inc(0.5)
        m.request_done("inbound", "web", "payments", "v1", 200, 0.02, request_bytes=1)
    assert _request_exposition(new) == generate_latest(old.registry)
    with pytest.raises(ValueError, match="non-negative"):
        new.requests.labels("inbound", "web", "payments", "v1", "200", "true", "").inc(-1)
    with pytest.raises(ValueError, match="expected 4 values"):
        new.request_bytes.labels("inbound", "web", "payments")
    with pytest.raises(ValueError, match="expected"):
        new.request_bytes.labels(direction="inbound")


def _request_samples(families: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                     float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in families if family.name in _REQUEST_NAMES for s in family.samples}


def test_workers_families_pickle_and_merge_to_the_whole_hosts() -> None:
    whole = Metrics()
    _traffic(whole)
    workers = []
    for part in range(3):
        worker = Metrics()
        _traffic(worker, part, 3)
        families = list(worker.registry.collect())
        sent = pickle.loads(pickle.dumps(families))  # what a worker sends the supervisor
        assert _request_samples(sent) == _request_samples(families) != {}
        workers.append(sent)
    supervisor = Metrics()  # serves no request itself
    merged = merge_families(supervisor.registry.collect(), workers, WORKER_GAUGES)
    expected = _request_samples(list(whole.registry.collect()))
    assert len(expected) > 100
    assert _request_samples(merged) == pytest.approx(expected)
    assert [f.name for f in merged if f.name in _REQUEST_NAMES] == list(_REQUEST_NAMES)


def test_a_collect_in_another_thread_sees_whole_rows() -> None:
    """The admin API renders in a thread while the request path counts (new label sets too):
    every collect completes, and a histogram row is at most the one request being counted
    behind (its sum may hold it before its bucket does, as with prometheus-client)."""
    m = Metrics()
    stop = threading.Event()

    def count() -> None:
        for i in range(200_000):
            if stop.is_set():
                return
            m.request_done("outbound", "web", f"d{i % 300}", "v1", 200, 0.25)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        for _ in range(20):
            for family in m.request_series.collect():
                if family.name != "meshd_request_duration_seconds":
                    continue
                values = {}
                for s in family.samples:
                    values.setdefault(s.labels["destination"], {})[
                        s.name + s.labels.get("le", "")] = s.value
                for row in values.values():
                    n = row["meshd_request_duration_seconds_count"]
                    assert row["meshd_request_duration_seconds_bucket+Inf"] == n
                    assert n * 0.25 <= row["meshd_request_duration_seconds_sum"] <= (n + 1) * 0.25
    finally:
        stop.set()
        counter.join()
