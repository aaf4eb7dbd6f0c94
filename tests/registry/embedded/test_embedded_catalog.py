"""Catalog register/deregister (other nodes), and health state/node across nodes."""

from __future__ import annotations

import httpx
import trio
from registry_testing import Registry

NODE_ID = "b4f7e1a2-3c4d-4e5f-8a9b-0c1d2e3f4a5b"


async def _register_other(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/catalog/register", json={
        "Node": "other", "ID": NODE_ID, "Address": "10.1.2.3", "NodeMeta": {"rack": "r1"},
        "Service": {"Service": "db", "ID": "db-1", "Port": 5432, "Tags": ["primary"]},
        "Checks": [
            {"CheckID": "disk", "Name": "disk", "Status": "passing"},
            {"CheckID": "db-alive", "Name": "db alive", "ServiceID": "db-1",
             "Status": "warning", "Output": "slow"},
        ],
    })
    assert (r.status_code, r.json()) == (200, True), r.text


async def test_catalog_register_adds_a_node_with_service_and_checks(registry: Registry) -> None:
    client = registry.client
    index = int((await client.get("/v1/catalog/nodes")).headers["X-Consul-Index"])
    await _register_other(client)
    nodes = (await client.get("/v1/catalog/nodes")).json()
    assert sorted(n["Node"] for n in nodes) == sorted([registry.node, "other"])
    other = next(n for n in nodes if n["Node"] == "other")
    assert (other["ID"], other["Address"], other["Meta"]) == (NODE_ID, "10.1.2.3", {"rack": "r1"})
    r = await client.get("/v1/catalog/nodes")
    assert int(r.headers["X-Consul-Index"]) > index

    assert (await client.get("/v1/catalog/services")).json()["db"] == ["primary"]
    [db] = (await client.get("/v1/catalog/service/db")).json()
    assert (db["Node"], db["Address"], db["ServiceID"], db["ServicePort"]) == (
        "other", "10.1.2.3", "db-1", 5432)
    assert db["NodeMeta"] == {"rack": "r1"}
    node = (await client.get("/v1/catalog/node/other")).json()
    assert node["Node"]["Node"] == "other" and list(node["Services"]) == ["db-1"]
    # not an agent service: the agent endpoints do not list it
    assert "db-1" not in (await client.get("/v1/agent/services")).json()

    [entry] = (await client.get("/v1/health/service/db")).json()
    assert entry["Node"]["Node"] == "other"
    assert [c["CheckID"] for c in entry["Checks"]] == ["db-alive", "disk"] or \
        [c["CheckID"] for c in entry["Checks"]] == ["disk", "db-alive"]
    alive = next(c for c in entry["Checks"] if c["CheckID"] == "db-alive")
    assert (alive["Status"], alive["Output"], alive["ServiceName"], alive["Node"]) == (
        "warning", "slow", "db", "other")
    assert (await client.get("/v1/health/service/db?passing")).json() == []

    checks = (await client.get("/v1/health/node/other")).json()
    assert sorted(c["CheckID"] for c in checks) == ["db-alive", "disk"]
    warning = (await client.get("/v1/health/state/warning")).json()
    assert [(c["Node"], c["CheckID"]) for c in warning] == [("other", "db-alive")]
    any_state = (await client.get("/v1/health/state/any")).json()
    assert ("other", "disk") in {(c["Node"], c["CheckID"]) for c in any_state}
    assert (registry.node, "serfHealth") in {(c["Node"], c["CheckID"]) for c in any_state}
    assert (await client.get("/v1/health/state/sideways")).status_code in (400, 500)
    assert (await client.get("/v1/health/node/nobody")).json() == []


async def test_catalog_register_updates_and_deregisters(registry: Registry) -> None:
    client = registry.client
    await _register_other(client)
    # a check update through the catalog (no node change)
    r = await client.put("/v1/catalog/register", json={
        "Node": "other", "Address": "10.1.2.3", "SkipNodeUpdate": True,
        "Check": {"CheckID": "db-alive", "Name": "db alive", "ServiceID": "db-1",
                  "Status": "passing"}})
    assert r.status_code == 200, r.text
    assert len((await client.get("/v1/health/service/db?passing")).json()) == 1
    # a failing node-level check takes the node's services out of ?passing
    await client.put("/v1/catalog/register", json={
        "Node": "other", "Address": "10.1.2.3",
        "Check": {"CheckID": "disk", "Name": "disk", "Status": "critical"}})
    assert (await client.get("/v1/health/service/db?passing")).json() == []

    woke: list[httpx.Response] = []
    index = (await client.get("/v1/health/service/db")).headers["X-Consul-Index"]

    async def watch() -> None:
        woke.append(await client.get(f"/v1/health/service/db?index={index}&wait=10s"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.sleep(0.2)
        r = await client.put("/v1/catalog/deregister", json={"Node": "other",
                                                             "CheckID": "db-alive"})
        assert r.json() is True
    assert [c["CheckID"] for c in woke[0].json()[0]["Checks"]] == ["disk"]

    r = await client.put("/v1/catalog/deregister", json={"Node": "other", "ServiceID": "db-1"})
    assert r.json() is True
    assert (await client.get("/v1/catalog/service/db")).json() == []
    assert "db" not in (await client.get("/v1/catalog/services")).json()
    r = await client.put("/v1/catalog/deregister", json={"Node": "other"})
    assert r.json() is True
    assert [n["Node"] for n in (await client.get("/v1/catalog/nodes")).json()] == [registry.node]
    assert (await client.get("/v1/catalog/node/other")).json() is None
    # unknown things deregister as a no-op
    assert (await client.put("/v1/catalog/deregister", json={"Node": "ghost"})).json() is True


async def test_catalog_register_errors(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/catalog/register", json={"Address": "10.0.0.1"})
    assert r.status_code == 500 and "Must provide node" in r.text
    r = await client.put("/v1/catalog/register", json={"Node": "x"})
    assert r.status_code == 500 and "Must provide address" in r.text
    r = await client.put("/v1/catalog/register", json={"Node": "x", "Address": "1.2.3.4",
                                                       "Bogus": 1})
    assert (r.status_code, r.text) == (400, 'Request decode failed: json: unknown field "Bogus"')
    r = await client.put("/v1/catalog/register", json={
        "Node": "x", "Address": "1.2.3.4",
        "Check": {"CheckID": "c", "Name": "c", "ServiceID": "missing"}})
    assert r.status_code == 500 and "Missing service registration" in r.text
    assert (await client.get("/v1/catalog/node/x")).json() is None  # nothing half-written
