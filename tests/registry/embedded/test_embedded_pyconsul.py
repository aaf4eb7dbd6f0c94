"""py-consul (the client real deployments use against Consul) against the embedded registry."""

from __future__ import annotations

import base64
from functools import partial
from typing import Any

import consul
import pytest
import trio
from registry_testing import Registry


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


async def test_pyconsul_agent_health_and_kv(registry: Registry) -> None:
    c = consul.Consul(host=registry.host, port=registry.port, token=registry.token or None)
    check = consul.Check.ttl("10s")
    assert await _call(c.agent.service.register, "web", service_id="web-1", port=8080,
                       tags=["v1"], meta={"version": "v1"}, check=check)
    assert await _call(c.agent.service.register, "web", service_id="web-2", port=8081)
    services = await _call(c.agent.services)
    assert set(services) == {"web-1", "web-2"}

    index, nodes = await _call(c.health.service, "web", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["web-2"]  # web-1's TTL check is critical
    assert await _call(c.agent.check.ttl_pass, "service:web-1", "all good")
    index, nodes = await _call(c.health.service, "web", passing=True)
    assert sorted(n["Service"]["ID"] for n in nodes) == ["web-1", "web-2"]
    assert int(index) >= 1

    assert await _call(c.kv.put, "meshd/config/routes", "v1", cas=0)
    assert not await _call(c.kv.put, "meshd/config/routes", "v2", cas=0)
    index, entry = await _call(c.kv.get, "meshd/config/routes")
    assert entry["Value"] == b"v1"
    assert await _call(c.kv.put, "meshd/config/routes", "v2", cas=entry["ModifyIndex"])
    assert not await _call(c.kv.put, "meshd/config/routes", "v3", cas=entry["ModifyIndex"])
    index, keys = await _call(c.kv.get, "meshd/", keys=True, separator="/")
    assert keys == ["meshd/config/"]
    index, value = await _call(c.kv.get, "missing")
    assert value is None and int(index) >= 1

    assert await _call(c.agent.service.deregister, "web-2")
    assert not await _call(c.agent.service.deregister, "web-2")


async def test_pyconsul_blocking_kv_get(registry: Registry) -> None:
    c = consul.Consul(host=registry.host, port=registry.port, token=registry.token or None)
    await _call(c.kv.put, "flag", "off")
    index, entry = await _call(c.kv.get, "flag")
    result: list[Any] = []

    async def watch() -> None:
        result.append(await _call(c.kv.get, "flag", index=index, wait="10s"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.sleep(0.3)
        assert not result
        await _call(c.kv.put, "flag", "on")
    new_index, entry = result[0]
    assert int(new_index) > int(index) and entry["Value"] == b"on"

    started = trio.current_time()
    same_index, _ = await _call(c.kv.get, "flag", index=new_index, wait="1s")
    assert same_index == new_index and trio.current_time() - started >= 1.0


async def _eventually(fn: Any, *, within: float = 4.0) -> Any:
    with trio.fail_after(within):
        while True:
            result = await fn()
            if result:
                return result
            await trio.sleep(0.05)


async def test_pyconsul_checks_sessions_txn(registry: Registry) -> None:
    c = consul.Consul(host=registry.host, port=registry.port, token=registry.token or None)
    # a TTL check plus a TCP check the registry runs itself: Consul's multi-check IDs
    assert await _call(c.agent.service.register, "api", service_id="api-1", port=registry.port,
                       check=consul.Check.ttl("10s"),
                       extra_checks=[consul.Check.tcp("127.0.0.1", registry.port, "1s")])
    checks = await _call(c.agent.checks)
    assert {"service:api-1:1", "service:api-1:2"} <= set(checks)
    assert await _call(c.agent.check.ttl_pass, "service:api-1:1", "ok")

    async def passing() -> Any:
        _, nodes = await _call(c.health.service, "api", passing=True)
        return nodes

    [node] = await _eventually(passing)
    assert {ch["CheckID"]: ch["Status"] for ch in node["Checks"]}["service:api-1:2"] == "passing"

    # KV with check-and-set, delete with cas
    assert await _call(c.kv.put, "cfg/x", "1")
    _, entry = await _call(c.kv.get, "cfg/x")
    assert not await _call(c.kv.delete, "cfg/x", cas=entry["ModifyIndex"] + 1)
    assert await _call(c.kv.delete, "cfg/x", cas=entry["ModifyIndex"])
    _, gone = await _call(c.kv.get, "cfg/x")
    assert gone is None

    # sessions and locks
    sid = await _call(c.session.create, name="leader", lock_delay=0)
    _, info = await _call(c.session.info, sid)
    assert info["Name"] == "leader" and info["ID"] == sid
    assert await _call(c.kv.put, "service/leader", "me", acquire=sid)
    _, held = await _call(c.kv.get, "service/leader")
    assert held["Session"] == sid
    other = await _call(c.session.create, lock_delay=0)
    assert not await _call(c.kv.put, "service/leader", "them", acquire=other)
    index, sessions = await _call(c.session.list)
    assert {s["ID"] for s in sessions} == {sid, other}
    assert await _call(c.session.destroy, sid)
    _, released = await _call(c.kv.get, "service/leader")
    assert "Session" not in released
    assert await _call(c.kv.put, "service/leader", "them", acquire=other)
    new_index, sessions = await _call(c.session.list, index=index, wait="1s")
    assert int(new_index) > int(index) and [s["ID"] for s in sessions] == [other]

    # a transaction
    value = base64.b64encode(b"v").decode()
    result = await _call(c.txn.put, [
        {"KV": {"Verb": "set", "Key": "txn/a", "Value": value}},
        {"KV": {"Verb": "get", "Key": "txn/a"}},
    ])
    assert result["Errors"] is None and result["Results"][1]["KV"]["Value"] == value
    with pytest.raises(consul.ConsulException):
        await _call(c.txn.put, [{"KV": {"Verb": "get", "Key": "txn/missing"}}])
    _, keys = await _call(c.kv.get, "txn/", keys=True)
    assert keys == ["txn/a"]


async def test_pyconsul_catalog_and_health_reads(registry: Registry) -> None:
    c = consul.Consul(host=registry.host, port=registry.port, token=registry.token or None)
    assert await _call(c.catalog.register, "n1", "10.1.10.11",
                       service={"service": "s1", "port": 80},
                       check={"name": "c1", "serviceid": "s1", "status": "passing"},
                       node_meta={"rack": "a"})
    _, nodes = await _call(c.catalog.nodes)
    assert {n["Node"] for n in nodes} == {registry.node, "n1"}
    _, instances = await _call(c.catalog.service, "s1")
    assert [(i["Node"], i["ServicePort"]) for i in instances] == [("n1", 80)]
    _, checks = await _call(c.health.node, "n1")
    assert [ch["CheckID"] for ch in checks] == ["c1"]
    _, passing = await _call(c.health.state, "passing")
    assert "c1" in {ch["CheckID"] for ch in passing}
    assert await _call(c.catalog.deregister, "n1", service_id="s1")
    assert await _call(c.catalog.deregister, "n1")
    _, nodes = await _call(c.catalog.nodes)
    assert [n["Node"] for n in nodes] == [registry.node]
