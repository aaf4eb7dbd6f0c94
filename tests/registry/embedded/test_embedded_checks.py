"""Checks the registry runs itself (HTTP, TCP), several checks per service, outputs and notes,
maintenance mode, agent-local health, agent self/members: over real HTTP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from registry_testing import Registry, start_registry

from meshd.httpd import Request, Response, serve_http
from meshd.registry.embedded.check_status import StatusGate
from meshd.registry.embedded.server import listen_port


class App:
    """A local HTTP app whose answer the test changes."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"fine"
        self.port = 0
        self.hits = 0

    async def handle(self, request: Request) -> Response:
        self.hits += 1
        return Response(self.status, self.body, [("Content-Type", "text/plain")])

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(serve_http, self.handle, "127.0.0.1", 0)
        self.port = listen_port(listeners)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(probe: Callable[[], Any], *, within: float = 4.0) -> Any:
    """Poll an async probe until it returns something truthy."""
    with trio.fail_after(within):
        while True:
            result = await probe()
            if result:
                return result
            await trio.sleep(0.05)


async def checks(client: httpx.AsyncClient) -> dict[str, Any]:
    return (await client.get("/v1/agent/checks")).json()  # type: ignore[no-any-return]


async def test_http_and_tcp_checks_run_at_their_interval(
        client: httpx.AsyncClient, nursery: trio.Nursery) -> None:
    app = App()
    await app.start(nursery)
    closed = _closed_port()
    r = await client.put("/v1/agent/service/register", json={
        "Name": "web", "Port": app.port, "Checks": [
            {"HTTP": f"http://127.0.0.1:{app.port}/health", "Interval": "1s"},
            {"TCP": f"127.0.0.1:{app.port}", "Interval": "1s", "Timeout": "2s"},
            {"TCP": f"127.0.0.1:{closed}", "Interval": "1s"},
        ]})
    assert r.status_code == 200, r.text
    first = await checks(client)
    assert sorted(first) == ["service:web:1", "service:web:2", "service:web:3"]
    assert (first["service:web:1"]["Status"], first["service:web:1"]["Output"]) == ("critical",
                                                                                   "")
    assert first["service:web:1"]["Type"] == "http" and first["service:web:2"]["Type"] == "tcp"
    assert first["service:web:1"]["Interval"] == "1s"
    assert first["service:web:1"]["Timeout"] == "10s"  # the default
    assert first["service:web:2"]["Timeout"] == "2s"

    async def settled() -> dict[str, Any] | None:
        now = await checks(client)
        ok = (now["service:web:1"]["Status"] == "passing"
              and now["service:web:2"]["Status"] == "passing" and app.hits > 0
              and now["service:web:3"]["Output"] != "")
        return now if ok else None

    now = await eventually(settled)  # first run within one interval
    assert "200" in now["service:web:1"]["Output"] and "fine" in now["service:web:1"]["Output"]
    assert now["service:web:2"]["Output"].endswith("Success")
    assert now["service:web:3"]["Status"] == "critical" and now["service:web:3"]["Output"]
    passing = (await client.get("/v1/health/service/web?passing")).json()
    assert passing == []  # one of its checks is critical

    app.status = 429
    await eventually(lambda: _status_is(client, "service:web:1", "warning"))
    app.status = 503
    await eventually(lambda: _status_is(client, "service:web:1", "critical"))
    await client.put("/v1/agent/service/deregister/web")
    assert await checks(client) == {}


async def _status_is(client: httpx.AsyncClient, check_id: str, status: str) -> bool:
    return bool((await checks(client))[check_id]["Status"] == status)


@pytest.mark.embedded_only("shortens the minimum check interval")
async def test_thresholds_first_run_and_output_limit(nursery: trio.Nursery) -> None:
    app = App()
    await app.start(nursery)
    reg = await start_registry(nursery, check_min_interval=0.05)
    client = reg.client
    async with client:
        await client.put("/v1/agent/service/register", json={"Name": "api", "Check": {
            "CheckID": "api-http", "HTTP": f"http://127.0.0.1:{app.port}/", "Interval": "100ms",
            "SuccessBeforePassing": 3, "FailuresBeforeWarning": 1, "FailuresBeforeCritical": 4,
            "OutputMaxSize": 40}})
        await eventually(lambda: _status_is(client, "api-http", "passing"))
        assert app.hits >= 3  # three good runs before it flipped to passing
        app.body = b"x" * 100
        await eventually(lambda: _output_contains(client, "api-http", "captured 40 of"))
        app.status = 500
        await eventually(lambda: _status_is(client, "api-http", "warning"))
        await eventually(lambda: _status_is(client, "api-http", "critical"))
        # a re-registered check gets a fresh task and keeps its state until it runs
        await client.put("/v1/agent/check/register", json={
            "Name": "slow", "TCP": f"127.0.0.1:{app.port}", "Interval": "2s"})
        assert (await checks(client))["slow"]["Status"] == "critical"
        await eventually(lambda: _status_is(client, "slow", "passing"), within=3.0)
        nursery.cancel_scope.cancel()


async def _output_contains(client: httpx.AsyncClient, check_id: str, text: str) -> bool:
    return text in (await checks(client))[check_id]["Output"]


@pytest.mark.parametrize(("gate", "runs", "reported"), [
    (StatusGate(), ["passing", "critical"], ["passing", "critical"]),
    (StatusGate(success_before_passing=2), ["passing", "passing", "critical", "passing"],
     [None, "passing", "critical", None]),
    (StatusGate(failures_before_critical=3), ["critical"] * 3 + ["warning"],
     [None, None, "critical", "warning"]),
    (StatusGate(failures_before_warning=1, failures_before_critical=2),
     ["critical", "critical", "passing", "critical"], ["warning", "critical", "passing",
                                                       "warning"]),
])
def test_status_gate(gate: StatusGate, runs: list[str], reported: list[str | None]) -> None:
    assert [gate.record(status) for status in runs] == reported


async def test_notes_output_and_truncation(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/agent/check/register", json={
        "Name": "disk", "Notes": "checks /var", "TTL": "30s", "OutputMaxSize": 10})
    assert r.status_code == 200, r.text
    await client.put("/v1/agent/check/update/disk",
                     json={"Status": "warning", "Output": "0123456789abcdefghij"})
    check = (await checks(client))["disk"]
    assert check["Notes"] == "checks /var" and check["Status"] == "warning"
    assert check["Output"] == "0123456789 ... (captured 10 of 20 bytes)"
    await client.put("/v1/agent/check/pass/disk", params={"note": "ok"})
    check = (await checks(client))["disk"]
    assert (check["Status"], check["Output"], check["Notes"]) == ("passing", "ok", "checks /var")


async def test_service_and_node_maintenance(registry: Registry) -> None:
    client = registry.client
    for sid in ("web-1", "web-2"):
        await client.put("/v1/agent/service/register", json={
            "Name": "web", "ID": sid, "Check": {"TTL": "30s", "Status": "passing"}})
    r = await client.put("/v1/agent/service/maintenance/web-1?enable=true&reason=upgrading")
    assert (r.status_code, r.content) == (200, b"")
    maint = (await checks(client))["_service_maintenance:web-1"]
    assert (maint["Status"], maint["Notes"], maint["ServiceID"]) == ("critical", "upgrading",
                                                                     "web-1")
    assert maint["Name"] == "Service Maintenance Mode"
    passing = (await client.get("/v1/health/service/web?passing")).json()
    assert [e["Service"]["ID"] for e in passing] == ["web-2"]
    r = await client.get("/v1/agent/health/service/id/web-1")
    assert r.status_code == 503 and r.json()["AggregatedStatus"] == "maintenance"
    await client.put("/v1/agent/service/maintenance/web-1?enable=false")
    assert "_service_maintenance:web-1" not in await checks(client)

    await client.put("/v1/agent/maintenance?enable=true")
    node_maint = (await checks(client))["_node_maintenance"]
    assert node_maint["Notes"].startswith("Maintenance mode is enabled for this node")
    assert (await client.get("/v1/health/service/web?passing")).json() == []
    await client.put("/v1/agent/maintenance?enable=false")
    assert len((await client.get("/v1/health/service/web?passing")).json()) == 2

    r = await client.put("/v1/agent/maintenance")
    assert (r.status_code, r.text) == (400, "Missing value for enable")
    r = await client.put("/v1/agent/maintenance?enable=maybe")
    assert (r.status_code, r.text) == (400, 'Invalid value for enable: "maybe"')
    r = await client.put("/v1/agent/service/maintenance/ghost?enable=true")
    assert r.status_code == 404 and r.text.startswith('Unknown service ID "ghost"')


async def test_agent_health_endpoints(client: httpx.AsyncClient) -> None:
    await client.put("/v1/agent/service/register", json={
        "Name": "api", "ID": "api-1", "Check": {"CheckID": "api-1-ttl", "TTL": "30s"}})
    await client.put("/v1/agent/check/pass/api-1-ttl")
    r = await client.get("/v1/agent/health/service/id/api-1")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"AggregatedStatus", "Service", "Checks"}
    assert body["AggregatedStatus"] == "passing" and body["Service"]["ID"] == "api-1"
    assert [c["CheckID"] for c in body["Checks"]] == ["api-1-ttl"]
    await client.put("/v1/agent/check/warn/api-1-ttl")
    r = await client.get("/v1/agent/health/service/id/api-1?format=text")
    assert (r.status_code, r.text) == (429, "warning")
    await client.put("/v1/agent/check/fail/api-1-ttl")
    r = await client.get("/v1/agent/health/service/name/api")
    assert r.status_code == 503
    assert [e["AggregatedStatus"] for e in r.json()] == ["critical"]
    r = await client.get("/v1/agent/health/service/id/ghost", params={"format": "text"})
    assert (r.status_code, r.text) == (404, "ServiceId ghost not found")
    r = await client.get("/v1/agent/health/service/name/ghost")
    assert r.status_code == 404


async def test_agent_self_and_members(registry: Registry) -> None:
    client = registry.client
    await client.put("/v1/agent/service/register", json={"Name": "web", "Check": {"TTL": "9s"}})
    me = (await client.get("/v1/agent/self")).json()
    assert set(me) >= {"Member", "Stats", "Config", "Coord", "DebugConfig", "Meta"}
    assert me["Config"]["NodeName"] == registry.node
    assert me["Config"]["Datacenter"] == "dc1"
    assert me["Member"]["Name"] == registry.node and me["Member"]["Status"] == 1
    leader = (await client.get("/v1/status/leader")).json()
    assert me["Stats"]["consul"]["leader_addr"] == leader
    members = (await client.get("/v1/agent/members")).json()
    assert [m["Name"] for m in members] == [registry.node]
    assert {"Name", "Addr", "Port", "Tags", "Status"} <= set(members[0])
    assert members[0]["Tags"]["role"] == "consul"
    if registry.embedded:
        assert me["Stats"]["agent"]["services"] == "1"
        assert me["Stats"]["agent"]["checks"] == "1"
