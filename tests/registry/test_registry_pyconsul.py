"""py-consul (the client real deployments use against Consul) against the embedded registry."""

from __future__ import annotations

from functools import partial
from typing import Any

import consul
import trio
from conftest import Registry


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


async def test_pyconsul_agent_health_and_kv(registry: Registry) -> None:
    c = consul.Consul(host="127.0.0.1", port=registry.port)
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
    c = consul.Consul(host="127.0.0.1", port=registry.port)
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
