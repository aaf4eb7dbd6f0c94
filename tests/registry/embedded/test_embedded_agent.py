"""Agent, catalog and health endpoints over real HTTP."""

from __future__ import annotations

import httpx
import trio
from registry_testing import Registry


async def register(client: httpx.AsyncClient, body: dict[str, object], **params: str) -> None:
    r = await client.put("/v1/agent/service/register", json=body, params=params)
    assert r.status_code == 200, r.text
    assert r.content == b""


async def test_plain_register_lists_exactly_nine_keys(client: httpx.AsyncClient) -> None:
    await register(client, {"name": "foo"})
    services = (await client.get("/v1/agent/services")).json()
    assert set(services) == {"foo"}
    assert set(services["foo"]) == {
        "Address", "Datacenter", "EnableTagOverride", "ID", "Meta", "Port", "Service", "Tags",
        "Weights",
    }
    assert services["foo"]["Tags"] == [] and services["foo"]["Meta"] == {}
    assert services["foo"]["Weights"] == {"Passing": 1, "Warning": 1}


async def test_register_fields_and_deregister(client: httpx.AsyncClient) -> None:
    await register(client, {
        "Name": "web", "ID": "web-1", "Tags": ["v1", "v1"], "Address": "10.0.0.5", "Port": 8080,
        "Meta": {"version": "v1"}, "enable_tag_override": True, "Weights": {"Passing": 3,
                                                                            "Warning": 1},
    })
    svc = (await client.get("/v1/agent/service/web-1")).json()
    assert svc["Tags"] == ["v1", "v1"] and svc["Meta"] == {"version": "v1"}
    assert svc["TaggedAddresses"] == {"lan_ipv4": {"Address": "10.0.0.5", "Port": 8080},
                                      "wan_ipv4": {"Address": "10.0.0.5", "Port": 8080}}
    assert svc["EnableTagOverride"] is True and svc["Weights"]["Passing"] == 3
    r = await client.get("/v1/agent/service/web-1")
    assert r.headers["X-Consul-ContentHash"] == svc["ContentHash"]

    r = await client.put("/v1/agent/service/deregister/web-1")
    assert r.status_code == 200 and r.content == b""
    assert (await client.get("/v1/agent/services")).json() == {}
    r = await client.put("/v1/agent/service/deregister/web-1")
    assert r.status_code == 404
    assert r.text == ('Unknown service ID "web-1". Ensure that the service ID is passed, not the '
                      "service name.")
    r = await client.get("/v1/agent/service/web-1")
    assert (r.status_code, r.text) == (404, "unknown service ID: web-1")


async def test_connect_proxy_kind(client: httpx.AsyncClient) -> None:
    await register(client, {
        "Name": "web-sidecar-proxy", "ID": "web-1-proxy", "Kind": "connect-proxy", "Port": 21000,
        "Proxy": {"destination_service_name": "web", "DestinationServiceID": "web-1",
                  "LocalServicePort": 8080, "Upstreams": [{"DestinationName": "payments",
                                                           "LocalBindPort": 9191}]},
    })
    svc = (await client.get("/v1/agent/services")).json()["web-1-proxy"]
    assert svc["Kind"] == "connect-proxy"
    assert svc["Proxy"]["DestinationServiceName"] == "web"
    assert svc["Proxy"]["Upstreams"] == [{"DestinationName": "payments", "LocalBindPort": 9191}]
    cat = (await client.get("/v1/catalog/service/web-sidecar-proxy")).json()
    assert cat[0]["ServiceKind"] == "connect-proxy"
    assert cat[0]["ServiceProxy"]["LocalServicePort"] == 8080
    r = await client.put("/v1/agent/service/register",
                         json={"Name": "p", "Kind": "connect-proxy", "Port": 1})
    assert r.status_code == 400


async def test_check_ids_status_and_reregister_keeps_state(client: httpx.AsyncClient) -> None:
    await register(client, {"Name": "api", "Check": {"TTL": "10s"},
                            "Checks": [{"ttl": "10s", "Status": "passing"}, {"TTL": 10**10}]})
    checks = (await client.get("/v1/agent/checks")).json()
    assert sorted(checks) == ["service:api:1", "service:api:2", "service:api:3"]
    assert checks["service:api:1"]["Status"] == "critical"
    assert checks["service:api:2"]["Status"] == "passing"
    assert checks["service:api:1"]["Name"] == "Service 'api' check"
    assert checks["service:api:1"]["Type"] == "ttl"

    await client.put("/v1/agent/check/pass/service:api:1", params={"note": "fine"})
    await register(client, {"Name": "api", "Tags": ["new"], "Check": {"TTL": "10s"},
                            "Checks": [{"ttl": "10s"}, {"TTL": "10s"}]})
    checks = (await client.get("/v1/agent/checks")).json()
    assert checks["service:api:1"]["Status"] == "passing"
    assert checks["service:api:1"]["Output"] == "fine"
    assert checks["service:api:1"]["ServiceTags"] == ["new"]

    await register(client, {"Name": "api", "Check": {"TTL": "10s"}},
                   **{"replace-existing-checks": "true"})
    assert sorted((await client.get("/v1/agent/checks")).json()) == ["service:api"]


async def test_ttl_pass_warn_fail_update_and_expiry(client: httpx.AsyncClient) -> None:
    await register(client, {"Name": "web", "Check": {"CheckID": "web-ttl", "TTL": "200ms"}})

    async def status() -> tuple[str, str]:
        c = (await client.get("/v1/agent/checks")).json()["web-ttl"]
        return c["Status"], c["Output"]

    assert await status() == ("critical", "")
    assert (await client.put("/v1/agent/check/pass/web-ttl?note=up")).status_code == 200
    assert await status() == ("passing", "up")
    await client.put("/v1/agent/check/warn/web-ttl")
    assert await status() == ("warning", "")
    await client.put("/v1/agent/check/fail/web-ttl?note=down")
    assert await status() == ("critical", "down")
    r = await client.put("/v1/agent/check/update/web-ttl",
                         json={"Status": "passing", "Output": "via update"})
    assert r.status_code == 200
    assert await status() == ("passing", "via update")
    r = await client.put("/v1/agent/check/update/web-ttl", json={"Status": "bogus"})
    assert (r.status_code, r.text) == (400, "Invalid check status: 'bogus'")

    # keep it alive past several TTLs, then let it expire
    for _ in range(4):
        await trio.sleep(0.1)
        await client.put("/v1/agent/check/pass/web-ttl")
    assert (await status())[0] == "passing"
    await trio.sleep(0.35)
    assert await status() == ("critical", "TTL expired")

    await client.put("/v1/agent/check/pass/web-ttl?note=last words")
    await trio.sleep(0.35)
    assert await status() == ("critical",
                              "TTL expired (last output before timeout follows): last words")

    r = await client.put("/v1/agent/check/pass/nope")
    assert r.status_code == 404 and r.text.startswith('Unknown check ID "nope"')


async def test_check_register_and_deregister(client: httpx.AsyncClient) -> None:
    await register(client, {"Name": "db"})
    r = await client.put("/v1/agent/check/register",
                         json={"name": "db-alive", "ttl": "5s", "serviceid": "db",
                               "notes": "n", "DeregisterCriticalServiceAfter": "90s"})
    assert r.status_code == 200, r.text
    check = (await client.get("/v1/agent/checks")).json()["db-alive"]
    assert (check["ServiceID"], check["ServiceName"], check["Notes"]) == ("db", "db", "n")
    r = await client.put("/v1/agent/check/register",
                         json={"name": "x", "ttl": "5s", "ServiceID": "nope"})
    assert (r.status_code, r.text) == (404, 'ServiceID "nope" does not exist')
    r = await client.put("/v1/agent/check/register", json={"ttl": "5s"})
    assert (r.status_code, r.text) == (400, "Missing check name")
    r = await client.put("/v1/agent/check/register",
                         json={"name": "h", "http": "http://x", "interval": "10s", "ttl": "1s"})
    assert (r.status_code, r.text) == (400, "Invalid check: Interval and TTL cannot both be "
                                            "specified")
    assert (await client.put("/v1/agent/check/deregister/db-alive")).status_code == 200
    assert (await client.put("/v1/agent/check/deregister/db-alive")).status_code == 404
    r = await client.put("/v1/agent/check/register", json={"name": "n", "http": "http://x",
                                                           "interval": "10s"})
    assert r.status_code == 200
    # an HTTP check is not a TTL check
    r = await client.put("/v1/agent/check/pass/n")
    assert (r.status_code, r.text) == (500, 'CheckID "n" does not have associated TTL')


async def test_health_service_passing_filter_and_node_checks(registry: Registry) -> None:
    client = registry.client
    for i in (1, 2):
        await register(client, {"Name": "web", "ID": f"web-{i}", "Port": 8000 + i,
                                "Tags": [f"v{i}"], "Check": {"TTL": "30s"}})
    await client.put("/v1/agent/check/pass/service:web-1")
    entries = (await client.get("/v1/health/service/web")).json()
    assert [e["Service"]["ID"] for e in entries] == ["web-1", "web-2"]
    assert [c["CheckID"] for c in entries[0]["Checks"]] == ["serfHealth", "service:web-1"]
    assert set(entries[0]) == {"Node", "Service", "Checks"}
    passing = (await client.get("/v1/health/service/web?passing")).json()
    assert [e["Service"]["ID"] for e in passing] == ["web-1"]
    assert len((await client.get("/v1/health/service/web?passing=false")).json()) == 2
    r = await client.get("/v1/health/service/web?passing=maybe")
    assert (r.status_code, r.text) == (400, "Invalid value for ?passing")
    tagged = (await client.get("/v1/health/service/web", params={"tag": "v2"})).json()
    assert [e["Service"]["ID"] for e in tagged] == ["web-2"]
    await client.put("/v1/agent/check/warn/service:web-2")
    assert len((await client.get("/v1/health/service/web?passing=1")).json()) == 1

    # a failing node-level check takes every instance out of ?passing
    await client.put("/v1/agent/check/register", json={"Name": "disk", "TTL": "30s"})
    assert (await client.get("/v1/health/service/web?passing")).json() == []
    state = (await client.get("/v1/health/state/critical")).json()
    assert [c["CheckID"] for c in state] == ["disk"]
    anyc = (await client.get("/v1/health/state/any")).json()
    assert [c["CheckID"] for c in anyc] == ["disk", "serfHealth", "service:web-1",
                                            "service:web-2"]
    assert [c["CheckID"] for c in (await client.get("/v1/health/checks/web")).json()] == [
        "service:web-1", "service:web-2"]
    assert len((await client.get(f"/v1/health/node/{registry.node}")).json()) == 4
    assert (await client.get("/v1/health/node/other")).json() == []
    assert (await client.get("/v1/health/service/unknown")).json() == []


async def test_catalog_shapes_and_standing_state(registry: Registry) -> None:
    client = registry.client
    assert (await client.get("/v1/catalog/services")).json() == {"consul": []}
    assert (await client.get("/v1/agent/services")).json() == {}
    assert (await client.get("/v1/agent/checks")).json() == {}
    state = (await client.get("/v1/health/state/any")).json()
    assert [(c["CheckID"], c["Status"], c["Output"]) for c in state] == [
        ("serfHealth", "passing", "Agent alive and reachable")]
    await register(client, {"Name": "web", "ID": "web-1", "Port": 80, "Tags": ["b", "a"]})
    await register(client, {"Name": "web", "ID": "web-2", "Port": 81, "Tags": ["a"]})
    assert (await client.get("/v1/catalog/services")).json() == {"consul": [], "web": ["a", "b"]}
    entries = (await client.get("/v1/catalog/service/web")).json()
    assert [e["ServiceID"] for e in entries] == ["web-1", "web-2"]
    assert set(entries[0]) == {
        "ID", "Node", "Address", "Datacenter", "TaggedAddresses", "NodeMeta", "ServiceKind",
        "ServiceID", "ServiceName", "ServiceTags", "ServiceAddress", "ServiceWeights",
        "ServiceMeta", "ServicePort", "ServiceEnableTagOverride", "ServiceProxy",
        "ServiceConnect", "CreateIndex", "ModifyIndex",
    }
    assert entries[0]["ServiceAddress"] == "" and entries[0]["Address"] == "127.0.0.1"
    assert entries[0]["ServiceProxy"] == {"Mode": "", "MeshGateway": {}, "Expose": {}}
    only_b = (await client.get("/v1/catalog/service/web?tag=B")).json()
    assert [e["ServiceID"] for e in only_b] == ["web-1"]
    assert (await client.get("/v1/catalog/service/nope")).json() == []
    consul = (await client.get("/v1/catalog/service/consul")).json()
    assert consul[0]["ServicePort"] == 8300
    assert (await client.get("/v1/catalog/datacenters")).json() == ["dc1"]
    nodes = (await client.get("/v1/catalog/nodes")).json()
    assert [n["Node"] for n in nodes] == [registry.node]
    node = (await client.get(f"/v1/catalog/node/{registry.node}")).json()
    assert sorted(node["Services"]) == ["consul", "web-1", "web-2"]
    r = await client.get("/v1/catalog/node/ghost")
    assert (r.status_code, r.text) == (200, "null")
    assert (await client.get("/v1/status/leader")).json() == "127.0.0.1:8300"
    assert (await client.get("/v1/status/peers")).json() == ["127.0.0.1:8300"]
    me = (await client.get("/v1/agent/self")).json()
    assert set(me) == {"Member", "xDS", "Stats", "Config", "Coord", "DebugConfig", "Meta"}
    assert me["Config"]["NodeName"] == registry.node
    members = (await client.get("/v1/agent/members")).json()
    assert members[0]["Status"] == 1
    r = await client.get("/v1/catalog/services?dc=dc9")
    assert (r.status_code, r.text) == (500, "No path to datacenter")


async def test_transport_errors(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/agent/service/register")
    assert r.status_code == 405 and r.text == "method GET not allowed"
    assert r.headers["Allow"] == "OPTIONS,PUT"
    r = await client.delete("/v1/catalog/services")
    assert r.status_code == 405 and r.headers["Allow"] == "OPTIONS,GET"
    r = await client.options("/v1/kv/x")
    assert (r.status_code, r.content) == (200, b"")
    assert r.headers["Allow"] == "OPTIONS,GET,PUT,DELETE"
    r = await client.get("/v1/nope")
    assert (r.status_code, r.text) == (404, "Invalid URL path: not a recognized HTTP API "
                                            "endpoint\n")
    r = await client.get("/")
    assert r.status_code == 200
    for r in (await client.get("/"), await client.get("/v1/nope")):
        assert r.headers["X-Consul-Default-ACL-Policy"] == "allow"
    r = await client.put("/v1/agent/service/register", json={"Name": "x", "Bogus": 1})
    assert (r.status_code, r.text) == (400, 'Request decode failed: json: unknown field "Bogus"')
    r = await client.put("/v1/agent/service/register", content=b"")
    assert (r.status_code, r.text) == (400, "Request decode failed: EOF")
    r = await client.put("/v1/agent/service/register", json={"Name": 5})
    assert r.status_code == 400 and r.text.startswith("Request decode failed: json: cannot")
    r = await client.put("/v1/agent/service/register", json={"Name": "x", "Check": {"TTL": "5q"}})
    assert (r.status_code, r.text) == (400, 'Request decode failed: time: invalid duration "5q"')
    r = await client.put("/v1/agent/service/register", json={"ID": "x"})
    assert (r.status_code, r.text) == (400, "Missing service name")
    r = await client.put("/v1/agent/service/register", json={"Name": "x", "Address": "0.0.0.0"})
    assert (r.status_code, r.text) == (400, "Invalid service address")
    r = await client.put("/v1/agent/service/register",
                         json={"Name": "x", "Meta": {"consul-x": "y"}})
    assert r.status_code == 400 and r.text.startswith("Invalid Service Meta: ")
    r = await client.put("/v1/agent/service/register",
                         json={"Name": "x", "Check": {"TTL": "5s", "Status": "up"}})
    assert (r.status_code, r.text) == (400, "Status for checks must 'passing', 'warning', "
                                            "'critical'")
    r = await client.get("/v1/health/service/web?index=abc")
    assert (r.status_code, r.text) == (400, "Invalid index")
    r = await client.get("/v1/health/service/web?index=1&wait=forever")
    assert (r.status_code, r.text) == (400, "Invalid wait time")
    r = await client.get("/v1/catalog/services?stale&consistent")
    assert r.status_code == 400
    r = await client.get("/v1/catalog/services?stale")
    assert r.headers["X-Consul-Effective-Consistency"] == "stale"
    r = await client.get("/v1/catalog/services?filter=Service%20==%20x")
    assert r.status_code == 400
    r = await client.get("/v1/catalog/services?pretty")
    assert r.text.startswith("{\n    ") and r.text.endswith("\n")
    r = await client.get("/v1/acl/tokens")
    assert (r.status_code, r.text) == (401, "ACL support disabled")
