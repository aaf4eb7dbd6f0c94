"""Spans exported over OTLP/HTTP by two meshds for requests web -> payments, received by a real
OTLP receiver decoding the official protobuf messages (``otlp_testing``): one trace across both
hops with the parent links of W3C Trace Context, sampling as configured, and a collector that is
down or slow costing requests nothing (drops and failures counted, the queue bounded)."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import httpx
import pytest
import trio
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from otlp_testing import OTLPReceiver
from proxy_mesh_testing import OPEN, Host, make_host
from proxy_testing import TD, Backend, MiniCA, eventually, sample

from meshd.config.schema import (
    DefaultPolicy,
    DestinationRoutes,
    LocalService,
    RouteTable,
    SplitLeg,
    Subset,
    Upstream,
)
from meshd.metrics import Metrics
from meshd.proxy.core.view import MeshView, ViewCell
from meshd.registry.model import Endpoint, EndpointSet
from meshd.tracing.settings import TracingSettings
from meshd.tracing.spans import HostResource
from meshd.tracing.tracer import Tracer

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
EXPORT_INTERVAL = 0.05


@dataclass
class TracedMesh:
    a: Host  # web, upstream payments
    b: Host  # payments v1
    app: Backend
    tracers: dict[str, Tracer]

    @property
    def url(self) -> str:
        host, port = self.a.proxy.outbound_address("web", "payments")
        return f"http://{host}:{port}"


TracedMeshFactory = Callable[..., Awaitable[TracedMesh]]


@pytest.fixture
async def traced_mesh(tmp_path: Path, nursery: trio.Nursery) -> TracedMeshFactory:
    async def build(endpoint: str, sampler: str = "parentbased_always_on", *,
                    queue_limit: int = 2048, interval: float = EXPORT_INTERVAL,
                    export_timeout: float = 5.0) -> TracedMesh:
        ca = MiniCA.create()
        app = Backend("payments", "v1")
        await nursery.start(app.serve)
        settings = TracingSettings(endpoint=endpoint, sampler=sampler, timeout=export_timeout)
        hosts, tracers = {}, {}
        view = ViewCell(MeshView(routes=OPEN, endpoints=MappingProxyType({})))
        for node, services in (
                ("b", [LocalService("payments", app.port, version="v1")]),
                ("a", [LocalService("web", 1, upstreams=(Upstream("payments", 0),))])):
            metrics = Metrics()
            tracer = Tracer(settings, HostResource(node, TD), metrics,
                            queue_limit=queue_limit, interval=interval)
            hosts[node] = make_host(ca, tmp_path, node, services,
                                    view if node == "a" else None, tracer=tracer,
                                    metrics=metrics)
            tracers[node] = tracer
            await nursery.start(tracer.run)
            await nursery.start(hosts[node].proxy.run)
        view.set_routes(RouteTable((DestinationRoutes(
            "payments", subsets=(Subset("v1", "v1"),), split=(SplitLeg("v1", 100),)),),
            DefaultPolicy.ALLOW))
        view.set_endpoints(EndpointSet("payments", (Endpoint(
            "payments", "payments-v1", "b", "127.0.0.1", hosts["b"].port, "v1"),), 1, 0.0))
        return TracedMesh(hosts["a"], hosts["b"], app, tracers)

    return build


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> OTLPReceiver:
    found = OTLPReceiver()
    await nursery.start(found.serve)
    return found


async def test_one_request_is_one_trace_across_both_meshds(
        traced_mesh: TracedMeshFactory, receiver: OTLPReceiver) -> None:
    mesh = await traced_mesh(receiver.endpoint)
    async with httpx.AsyncClient(base_url=mesh.url) as client:
        response = await client.get("/version?x=1", headers={
            "traceparent": f"00-{TRACE}-{APP_SPAN}-01", "x-request-id": "req-7"})
    assert response.status_code == 200
    await eventually(lambda: len(receiver.trace(TRACE)) == 2)

    spans = {s.span.kind: s for s in receiver.trace(TRACE)}
    client, server = spans[Span.SpanKind.SPAN_KIND_CLIENT], spans[Span.SpanKind.SPAN_KIND_SERVER]
    assert client.parent_span_id == APP_SPAN  # the caller's span, from its traceparent
    assert server.parent_span_id == client.span_id  # the id meshd a sent on
    seen = response.json()["headers"]["traceparent"]
    assert seen == f"00-{TRACE}-{server.span_id}-01"  # the app's parent: meshd b's span
    assert len({client.span_id, server.span_id, APP_SPAN}) == 3

    assert (client.service, server.service) == ("web", "payments")
    assert client.resource["host.name"] == "a" and server.resource["host.name"] == "b"
    assert client.attributes == {
        "http.request.method": "GET", "url.path": "/version", "http.response.status_code": 200,
        "meshd.source": "web", "meshd.destination": "payments",
        "meshd.peer.identity": f"spiffe://{TD}/svc/payments", "meshd.request_id": "req-7",
        "meshd.subset": "v1", "meshd.route": "default",
        "meshd.endpoint": "b/payments-v1", "meshd.tries": 1}
    assert server.attributes["meshd.source"] == "web"
    assert server.attributes["meshd.peer.identity"] == f"spiffe://{TD}/svc/web"
    assert server.attributes["meshd.request_id"] == "req-7"
    assert server.attributes["meshd.subset"] == "v1"
    for s in (client, server):
        assert s.span.status.code == Status.STATUS_CODE_UNSET
        assert s.span.name == "GET payments"
        # the server's hop lies within the client's
        assert 0 < s.span.start_time_unix_nano <= s.span.end_time_unix_nano
    assert client.span.start_time_unix_nano <= server.span.start_time_unix_nano
    assert {path for path, _ in receiver.posts} == {"/v1/traces"}
    assert all(h["content-type"] == "application/x-protobuf" for _, h in receiver.posts)
    # counted once the exporter has read the receiver's answer (just after the receiver saw it)
    await eventually(lambda: all(sample(h.metrics, "meshd_trace_spans_exported_total") == 1
                                 for h in (mesh.a, mesh.b)))


async def test_a_5xx_is_an_error_span(traced_mesh: TracedMeshFactory,
                                      receiver: OTLPReceiver) -> None:
    mesh = await traced_mesh(receiver.endpoint)
    mesh.app.status = 503
    async with httpx.AsyncClient(base_url=mesh.url) as client:
        response = await client.get("/version", headers={
            "traceparent": f"00-{TRACE}-{APP_SPAN}-01"})
    assert response.status_code == 503
    await eventually(lambda: len(receiver.trace(TRACE)) == 2)
    for s in receiver.trace(TRACE):
        assert s.span.status.code == Status.STATUS_CODE_ERROR
        assert s.attributes["http.response.status_code"] == 503


async def test_sampling_follows_the_parent_then_the_sampler(
        traced_mesh: TracedMeshFactory, receiver: OTLPReceiver) -> None:
    mesh = await traced_mesh(receiver.endpoint)  # parentbased_always_on
    unsampled = "0af7651916cd43dd8448eb211c80319c"
    async with httpx.AsyncClient(base_url=mesh.url) as client:
        off = await client.get("/version", headers={
            "traceparent": f"00-{unsampled}-{APP_SPAN}-00"})
        new = await client.get("/version")
        on = await client.get("/version", headers={
            "traceparent": f"00-{TRACE}-{APP_SPAN}-01"})
    assert off.json()["headers"]["traceparent"].endswith("-00")  # the parent said no
    started = new.json()["headers"]["traceparent"]
    assert started.endswith("-01")  # a new trace, sampled by the root sampler: flag set
    await eventually(lambda: len(receiver.trace(TRACE)) == 2
                     and len(receiver.trace(started[3:35])) == 2)
    assert receiver.trace(unsampled) == []
    new_client = next(s for s in receiver.trace(started[3:35])
                      if s.span.kind == Span.SpanKind.SPAN_KIND_CLIENT)
    assert new_client.parent_span_id == ""  # a root span: meshd a started the trace
    assert on.status_code == 200


async def test_sampler_off_sends_no_span_and_clears_the_flag(
        traced_mesh: TracedMeshFactory, receiver: OTLPReceiver) -> None:
    mesh = await traced_mesh(receiver.endpoint, "always_off")
    async with httpx.AsyncClient(base_url=mesh.url) as client:
        for _ in range(3):
            response = await client.get("/version", headers={
                "traceparent": f"00-{TRACE}-{APP_SPAN}-01"})
            # this hop's decision is what it sends on: not sampled
            assert response.json()["headers"]["traceparent"].endswith("-00")
    await trio.sleep(EXPORT_INTERVAL * 4)  # a few export rounds
    assert receiver.spans == [] and receiver.posts == []
    assert all(t.queued == 0 and t.exported == 0 for t in mesh.tracers.values())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("collector", ["refusing", "silent", "failing"])
async def test_a_collector_down_costs_requests_nothing(
        traced_mesh: TracedMeshFactory, receiver: OTLPReceiver, collector: str) -> None:
    if collector == "refusing":
        endpoint = f"http://127.0.0.1:{_closed_port()}/v1/traces"
    else:
        receiver.hang, receiver.answer = collector == "silent", 503
        endpoint = receiver.endpoint
    mesh = await traced_mesh(endpoint, "always_on", export_timeout=0.2)
    async with httpx.AsyncClient(base_url=mesh.url) as client:
        for _ in range(20):
            assert (await client.get("/version")).status_code == 200
    a = mesh.a.metrics
    await eventually(lambda: sample(a, "meshd_trace_export_failures_total") >= 1)
    await eventually(lambda: sample(a, "meshd_trace_spans_dropped_total",
                                    reason="export_failed") >= 1)
    assert mesh.app.requests == 20
    assert receiver.spans == []


async def test_the_queue_is_bounded(traced_mesh: TracedMeshFactory,
                                    receiver: OTLPReceiver) -> None:
    # no export within the test: every span waits in the queue, which holds 4
    mesh = await traced_mesh(receiver.endpoint, "always_on", queue_limit=4, interval=3600)
    async with httpx.AsyncClient(base_url=mesh.url) as client:
        for _ in range(6):
            assert (await client.get("/version")).status_code == 200
    a = mesh.tracers["a"]
    await eventually(lambda: a.queued + a.dropped == 6)
    assert (a.queued, a.dropped) == (4, 2)
    assert sample(mesh.a.metrics, "meshd_trace_spans_dropped_total", reason="queue_full") == 2
    assert receiver.posts == []
