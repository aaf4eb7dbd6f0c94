"""The registry's own metrics: ``GET /v1/agent/metrics`` (Consul's endpoint: JSON, or Prometheus
text with ``?format=prometheus``) and ``GET /metrics`` (Prometheus text, the path scrapers
default to).

Both need what Consul asks for its endpoint, ``agent:read`` on the registry's node, with the
token given as for any endpoint (``?token=``, ``X-Consul-Token``, or ``Authorization: Bearer``:
what Prometheus' ``authorization`` scrape setting sends). An unknown token is refused, as
everywhere. The rendering reads every series and the process' /proc files: the shell runs it in a
worker thread."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshd.httpd import Request, Response
from meshd.registry.embedded.acl import AclResolver
from meshd.registry.embedded.store.records import ApiError

METRICS_PATHS = ("/metrics", "/v1/agent/metrics")


class MetricsApi:
    def __init__(self, acl: AclResolver, node_name: Callable[[], str],
                 registry: CollectorRegistry) -> None:
        self.acl = acl
        self.node_name = node_name
        self.registry = registry

    def authorize(self, request: Request) -> None:
        """Raise the ``ApiError`` to answer (405, 403) unless ``request`` may read metrics."""
        if request.method not in ("GET", "HEAD"):
            raise ApiError(405, f"method {request.method} not allowed")
        self.acl.authorize(request).require("agent", "read", self.node_name())

    def render(self, request: Request) -> Response:
        """The answer to an authorized request (blocking: run it in a worker thread)."""
        if request.path == "/metrics" or request.param("format") == "prometheus":
            return Response(200, generate_latest(self.registry),
                            [("Content-Type", CONTENT_TYPE_LATEST)])
        if request.param("format"):
            raise ApiError(400, f"unknown format {request.param('format')!r}: leave it out "
                           "(JSON) or use format=prometheus")
        return Response.json(consul_json(self.registry))


def consul_json(registry: CollectorRegistry) -> dict[str, Any]:
    """Consul's JSON shape (``Gauges``, ``Counters``, ``Samples``). Our counters are totals since
    the start, not per-interval like Consul's: ``Count`` and ``Sum`` are both the total."""
    gauges: list[dict[str, Any]] = []
    counters: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    for family in registry.collect():
        for s in family.samples:
            if family.type in ("gauge", "unknown"):
                gauges.append({"Name": s.name, "Value": s.value, "Labels": s.labels})
            elif family.type == "counter" and s.name.endswith("_total"):
                counters.append({"Name": s.name, "Count": s.value, "Sum": s.value,
                                 "Labels": s.labels})
            elif family.type == "histogram" and s.name.endswith(("_count", "_sum")):
                samples.append({"Name": s.name, "Value": s.value, "Labels": s.labels})
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")
    return {"Timestamp": now, "Gauges": gauges, "Points": [], "Counters": counters,
            "Samples": samples}
