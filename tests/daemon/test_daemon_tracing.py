"""Two real daemons exporting spans to a real OTLP/HTTP receiver: host-b configured by the
standard variable ``OTEL_EXPORTER_OTLP_ENDPOINT``, host-a by meshd.toml's ``[tracing]``; one
request through host-a's outbound listener makes one trace across both, and each daemon's
/metrics counts what it exported."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from mesh_testing import Mesh, open_mesh, start_daemon, wait_for
from net_testing import free_port
from otlp_testing import OTLPReceiver
from test_daemon import payments_app

from meshd.config.parse import routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable

TD = "test.mesh"
HOST_A = "127.0.21.2"
HOST_B = "127.0.21.3"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield await open_mesh(nursery, tmp_path, http, TD)


async def test_daemons_export_one_trace(mesh: Mesh, nursery: trio.Nursery,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = OTLPReceiver()
    await nursery.start(receiver.serve)
    app_port = free_port(HOST_B)
    await nursery.start(payments_app, HOST_B, app_port, "v1")
    await mesh.put_routes(routes_to_data(RouteTable(default_policy=DefaultPolicy.ALLOW))
                          | {"destinations": {"payments": {
                              "subsets": {"v1": {"version": "v1"}}, "split": {"v1": 100}}}})
    b_conf = mesh.host_config("host-b", HOST_B, [{
        "name": "payments", "port": app_port, "address": HOST_B, "version": "v1",
        "health": {"none": True}}])
    upstream_port = free_port("127.0.0.1")
    a_conf = mesh.host_config("host-a", HOST_A, [{
        "name": "web", "port": free_port(HOST_A), "health": {"none": True},
        "upstreams": [{"name": "payments", "local_port": upstream_port}]}],
        tracing={"endpoint": receiver.endpoint})

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
    await start_daemon(nursery, b_conf)  # reads the variable when it starts
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    await start_daemon(nursery, a_conf)

    url = f"http://127.0.0.1:{upstream_port}/pay"

    async def answered() -> bool:
        return (await mesh.http.get(url)).status_code == 200
    await wait_for(answered)  # host-a has seen host-b (these requests start their own traces)

    r = await mesh.http.get(url, headers={"traceparent": f"00-{TRACE}-{APP_SPAN}-01"})
    assert r.status_code == 200

    async def both_sides() -> bool:
        return len(receiver.trace(TRACE)) == 2
    await wait_for(both_sides)
    by_node = {s.resource["host.name"]: s for s in receiver.trace(TRACE)}
    assert by_node["host-a"].parent_span_id == APP_SPAN
    assert by_node["host-b"].parent_span_id == by_node["host-a"].span_id
    assert (by_node["host-a"].service, by_node["host-b"].service) == ("web", "payments")

    for conf in (a_conf, b_conf):
        metrics = (await mesh.http.get(
            f"http://{conf.admin_host}:{conf.admin_port}/metrics")).text
        exported = next(float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("meshd_trace_spans_exported_total "))
        assert exported >= 1
        assert 'meshd_trace_spans_dropped_total{reason="queue_full"} 0.0' in metrics
