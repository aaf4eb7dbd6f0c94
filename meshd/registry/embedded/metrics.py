"""The embedded registry's Prometheus series (docs/metrics.md lists them), on its own explicit
registry: what the shell counts as it serves (HTTP requests, blocking queries, writes, the
durable log) and, read from the state at each scrape, the catalog's sizes and the index."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from meshd.metrics import new_registry
from meshd.registry.embedded.state import RegistryState
from meshd.registry.embedded.store.records import Mutation

# fsync takes well under a millisecond on a fast disk, tens of milliseconds on a slow one
LOG_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
               0.5, 1.0, 2.5)
# Label values from what clients send are bounded: the route of requests no endpoint matched
# is "unmatched" (never the raw path), a method not in this list "other".
UNMATCHED = "unmatched"
KNOWN_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS"})


class RegistryMetrics:
    def __init__(self, state: RegistryState) -> None:
        self.registry = new_registry()
        r = self.registry
        self.http_requests = Counter(
            "meshd_registry_http_requests", "HTTP requests answered, by method, route (the "
            "endpoint's path, without its argument: /v1/kv/) and status code",
            ["method", "route", "code"], registry=r)
        self.blocking_queries = Gauge(
            "meshd_registry_blocking_queries", "blocking queries waiting for a change now",
            registry=r)
        self.writes = Counter(
            "meshd_registry_writes", "records written (put or deleted), by table: node, "
            "service, check, kv, session, acl-policy, acl-token...", ["table"], registry=r)
        self.log_append = Histogram(
            "meshd_registry_log_append_duration_seconds", "writing one write to the durable "
            "log and fsyncing it (with a data directory only)", buckets=LOG_BUCKETS,
            registry=r)
        self.log_errors = Counter(
            "meshd_registry_log_errors", "durable log operations that failed (the write is "
            "refused: append; the log keeps growing: compact)", ["operation"], registry=r)
        self.compactions = Counter(
            "meshd_registry_log_compactions", "snapshots written to replace the log",
            registry=r)
        r.register(_StateCollector(state))

    def wrote(self, mutation: Mutation) -> None:
        for table, count in Tally(op.table for op in mutation.ops).items():
            self.writes.labels(table).inc(count)


class _StateCollector(Collector):
    """Sizes read from the state at scrape time (nothing to keep up to date on writes)."""

    def __init__(self, state: RegistryState) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        state = self.state
        yield _gauge("meshd_registry_index", "the registry's index (X-Consul-Index): raises on "
                     "every write, never goes back", state.index)
        yield _gauge("meshd_registry_catalog_nodes", "nodes in the catalog", len(state.nodes))
        yield _gauge("meshd_registry_catalog_services", "distinct service names in the "
                     "catalog", len({s.name for s in state.services.values()}))
        yield _gauge("meshd_registry_catalog_service_instances", "service instances in the "
                     "catalog", len(state.services))
        checks = GaugeMetricFamily("meshd_registry_catalog_checks", "health checks by status",
                                   labels=["status"])
        by_status = Tally(c.status for c in state.checks.values())
        for status in sorted({"passing", "warning", "critical", *by_status}):
            checks.add_metric([status], by_status[status])
        yield checks
        yield _gauge("meshd_registry_kv_keys", "keys in the KV store", len(state.kv.entries))
        yield _gauge("meshd_registry_sessions", "sessions", len(state.sessions))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
