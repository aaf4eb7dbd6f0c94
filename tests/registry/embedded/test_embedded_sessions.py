"""Sessions (TTL, lock delay, behaviours, check-driven invalidation) and KV locks, over HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
from registry_testing import Registry, start_registry


async def create(client: httpx.AsyncClient, **body: Any) -> str:
    r = await client.put("/v1/session/create", json=body or None)
    assert r.status_code == 200, r.text
    return str(r.json()["ID"])


async def put(client: httpx.AsyncClient, key: str, value: bytes, **params: str) -> Any:
    r = await client.put(f"/v1/kv/{key}", content=value, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def entry(client: httpx.AsyncClient, key: str) -> dict[str, Any] | None:
    r = await client.get(f"/v1/kv/{key}")
    return r.json()[0] if r.status_code == 200 else None


async def test_session_lifecycle_and_shape(registry: Registry) -> None:
    client = registry.client
    sid = await create(client, Name="leader-election")
    [info] = (await client.get(f"/v1/session/info/{sid}")).json()
    assert info["ID"] == sid and info["Name"] == "leader-election"
    assert info["Node"] == registry.node and info["Behavior"] == "release"
    assert info["LockDelay"] == 15 * 10**9 and info["TTL"] == ""
    assert info["NodeChecks"] == ["serfHealth"]
    assert info["CreateIndex"] == info["ModifyIndex"] >= 1
    r = await client.get("/v1/session/list")
    assert [s["ID"] for s in r.json()] == [sid] and int(r.headers["X-Consul-Index"]) >= 1
    assert [s["ID"] for s in (await client.get(f"/v1/session/node/{registry.node}")).json()] == [
        sid]
    assert (await client.get("/v1/session/node/nobody")).json() == []
    [renewed] = (await client.put(f"/v1/session/renew/{sid}")).json()
    assert renewed["ID"] == sid
    r = await client.put("/v1/session/renew/00000000-0000-0000-0000-00000000dead")
    assert r.status_code == 404
    assert (await client.put(f"/v1/session/destroy/{sid}")).json() is True
    assert (await client.get(f"/v1/session/info/{sid}")).json() == []
    r = await client.put("/v1/session/create", json={"TTL": "1s"})  # below the 10 s minimum
    assert r.status_code == 500 and "Invalid Session TTL" in r.text
    r = await client.put("/v1/session/create", json={"Behavior": "explode"})
    assert r.status_code == 500
    r = await client.put("/v1/session/create", json={"Node": "nobody"})
    assert r.status_code == 500


async def test_acquire_release_and_lock_index(client: httpx.AsyncClient) -> None:
    a = await create(client, LockDelay="0s")
    b = await create(client, LockDelay="0s")
    assert await put(client, "lock", b"a-holds", acquire=a) is True
    held = await entry(client, "lock")
    assert held is not None and (held["Session"], held["LockIndex"]) == (a, 1)
    assert await put(client, "lock", b"b-wants", acquire=b) is False
    assert await put(client, "lock", b"a-again", acquire=a, flags="7") is True
    held = await entry(client, "lock")
    assert held is not None and (held["LockIndex"], held["Flags"]) == (1, 7)
    assert await put(client, "lock", b"plain") is True  # a plain write keeps the lock
    held = await entry(client, "lock")
    assert held is not None and held["Session"] == a
    assert await put(client, "lock", b"x", release=b) is False
    assert await put(client, "lock", b"released", release=a) is True
    free = await entry(client, "lock")
    assert free is not None and "Session" not in free and free["LockIndex"] == 1
    assert await put(client, "lock", b"b-holds", acquire=b) is True
    assert (await entry(client, "lock") or {})["LockIndex"] == 2
    r = await client.put("/v1/kv/lock?acquire=00000000-0000-0000-0000-00000000dead")
    assert r.status_code == 500 and "session" in r.text.lower()
    r = await client.put(f"/v1/kv/lock?acquire={a}&release={a}")
    assert r.status_code == 400 and r.text.startswith("Conflicting flags")


async def test_invalidation_releases_or_deletes_with_lock_delay(client: httpx.AsyncClient) -> None:
    releaser = await create(client, LockDelay="300ms")
    deleter = await create(client, Behavior="delete", LockDelay="0s")
    assert await put(client, "svc/leader", b"me", acquire=releaser)
    assert await put(client, "svc/ephemeral", b"me", acquire=deleter)
    await client.put(f"/v1/session/destroy/{releaser}")
    await client.put(f"/v1/session/destroy/{deleter}")
    left = await entry(client, "svc/leader")
    assert left is not None and "Session" not in left and left["Value"] is not None
    assert await entry(client, "svc/ephemeral") is None
    newcomer = await create(client, LockDelay="0s")
    assert await put(client, "svc/leader", b"new", acquire=newcomer) is False  # lock delay
    await trio.sleep(0.4)
    assert await put(client, "svc/leader", b"new", acquire=newcomer) is True


async def test_check_going_critical_invalidates_its_sessions(client: httpx.AsyncClient) -> None:
    await client.put("/v1/agent/check/register",
                     json={"Name": "disk", "TTL": "30s", "Status": "passing"})
    sid = await create(client, NodeChecks=["serfHealth", "disk"], LockDelay="0s")
    assert await put(client, "leader", b"me", acquire=sid)
    index = (await client.get("/v1/session/list")).headers["X-Consul-Index"]
    woke: list[httpx.Response] = []

    async def watch() -> None:
        woke.append(await client.get(f"/v1/session/list?index={index}&wait=10s"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.sleep(0.2)
        assert not woke  # a blocking session read waits
        await client.put("/v1/agent/check/fail/disk")
    assert woke[0].json() == [] and int(woke[0].headers["X-Consul-Index"]) > int(index)
    left = await entry(client, "leader")
    assert left is not None and "Session" not in left
    r = await client.put("/v1/session/create", json={"NodeChecks": ["disk"]})
    assert r.status_code == 500 and "critical" in r.text
    r = await client.put("/v1/session/create", json={"NodeChecks": ["nope"]})
    assert r.status_code == 500 and "Missing check" in r.text


@pytest.mark.embedded_only("lowers session_ttl_min to keep the test short")
async def test_ttl_session_expires_between_ttl_and_twice_ttl(nursery: trio.Nursery) -> None:
    reg = await start_registry(nursery, session_ttl_min=0.1)
    async with reg.client as client:
        sid = await create(client, TTL="200ms", LockDelay="0s")
        assert await put(client, "k", b"v", acquire=sid)
        for _ in range(5):  # renewed: alive well past 2 x TTL
            await trio.sleep(0.15)
            assert (await client.put(f"/v1/session/renew/{sid}")).status_code == 200
        renewed_at = trio.current_time()
        await trio.sleep(0.2)  # TTL has passed, not 2 x TTL: still there
        assert (await client.get(f"/v1/session/info/{sid}")).json() != []
        with trio.fail_after(2):
            index = (await client.get("/v1/session/list")).headers["X-Consul-Index"]
            while (await client.get(f"/v1/session/info/{sid}")).json():
                r = await client.get(f"/v1/session/list?index={index}&wait=2s")  # blocks
                index = r.headers["X-Consul-Index"]
        gone_after = trio.current_time() - renewed_at
        assert 0.2 <= gone_after < 0.6
        left = await entry(client, "k")
        assert left is not None and "Session" not in left
        nursery.cancel_scope.cancel()
