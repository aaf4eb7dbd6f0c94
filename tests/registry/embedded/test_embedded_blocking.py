"""Blocking queries: event-driven wake-ups, timeouts, index granularity."""

from __future__ import annotations

import resource

import httpx
import trio
from registry_testing import Registry


def _affordable_connections(wanted: int) -> int:
    """Both ends live in this process: each watcher costs two descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2 * wanted + 200:
        target = hard if hard == resource.RLIM_INFINITY else min(hard, 2 * wanted + 200)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(100, min(wanted, (soft - 200) // 2))


async def _index(r: httpx.Response) -> int:
    assert r.status_code in (200, 404), r.text
    return int(r.headers["X-Consul-Index"])


async def test_health_watch_wakes_on_register(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/health/service/web")
    index = await _index(r)
    assert r.json() == []
    result: list[httpx.Response] = []

    async def watch() -> None:
        result.append(await client.get(f"/v1/health/service/web?index={index}&wait=10s"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.sleep(0.2)
        assert not result  # still blocked
        started = trio.current_time()
        await client.put("/v1/agent/service/register", json={"Name": "web", "Port": 80})
    assert trio.current_time() - started < 1.0
    [r] = result
    assert r.status_code == 200 and await _index(r) > index
    assert [e["Service"]["ID"] for e in r.json()] == ["web"]


async def test_health_watch_times_out_with_same_index(client: httpx.AsyncClient) -> None:
    await client.put("/v1/agent/service/register", json={"Name": "web", "Port": 80})
    index = await _index(await client.get("/v1/health/service/web"))
    started = trio.current_time()
    r = await client.get(f"/v1/health/service/web?index={index}&wait=1s")
    elapsed = trio.current_time() - started
    assert 1.0 <= elapsed < 1.5
    assert r.status_code == 200 and await _index(r) == index
    assert len(r.json()) == 1
    assert r.headers["X-Consul-KnownLeader"] == "true"
    assert r.headers["X-Consul-LastContact"] == "0"


async def test_unrelated_service_does_not_wake_watcher(client: httpx.AsyncClient) -> None:
    await client.put("/v1/agent/service/register", json={"Name": "web", "Port": 80})
    index = await _index(await client.get("/v1/health/service/web"))
    result: list[httpx.Response] = []

    async def watch() -> None:
        result.append(await client.get(f"/v1/health/service/web?index={index}&wait=10s"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.sleep(0.1)
        await client.put("/v1/agent/service/register",
                         json={"Name": "other", "Check": {"TTL": "10s"}})
        await client.put("/v1/agent/check/pass/service:other")
        await client.put("/v1/kv/some/key", content=b"x")
        await trio.sleep(0.3)
        assert not result
        await client.put("/v1/agent/service/register",
                         json={"Name": "web", "Port": 80, "Tags": ["v2"]})
    [r] = result
    assert await _index(r) > index and r.json()[0]["Service"]["Tags"] == ["v2"]


async def test_catalog_services_watch(client: httpx.AsyncClient) -> None:
    index = await _index(await client.get("/v1/catalog/services"))
    async with trio.open_nursery() as nursery:
        result: list[httpx.Response] = []

        async def watch() -> None:
            result.append(await client.get(f"/v1/catalog/services?index={index}&wait=5s"))

        nursery.start_soon(watch)
        await trio.sleep(0.1)
        await client.put("/v1/agent/service/register", json={"Name": "db"})
    assert "db" in result[0].json() and await _index(result[0]) > index


async def test_kv_watch_key_and_prefix(client: httpx.AsyncClient) -> None:
    await client.put("/v1/kv/cfg/b", content=b"1")
    r = await client.get("/v1/kv/cfg/a")
    assert r.status_code == 404
    missing_index = await _index(r)
    results: dict[str, httpx.Response] = {}

    async def watch(name: str, url: str) -> None:
        results[name] = await client.get(url)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, "key", f"/v1/kv/cfg/a?index={missing_index}&wait=10s")
        await trio.sleep(0.1)
        await client.put("/v1/kv/unrelated", content=b"x")  # must not wake the key watcher
        await trio.sleep(0.2)
        assert "key" not in results
        await client.put("/v1/kv/cfg/a", content=b"hello")
    r = results["key"]
    assert r.status_code == 200 and r.json()[0]["Value"] == "aGVsbG8="
    assert await _index(r) > missing_index

    # a recursive watcher sees a deletion inside its prefix (tombstone)
    prefix_index = await _index(await client.get("/v1/kv/cfg/?recurse"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, "prefix", f"/v1/kv/cfg/?recurse&index={prefix_index}&wait=10s")
        await trio.sleep(0.1)
        await client.delete("/v1/kv/cfg/b")
    r = results["prefix"]
    assert [e["Key"] for e in r.json()] == ["cfg/a"] and await _index(r) > prefix_index


async def test_kv_watch_times_out(client: httpx.AsyncClient) -> None:
    await client.put("/v1/kv/k", content=b"v")
    index = await _index(await client.get("/v1/kv/k"))
    started = trio.current_time()
    r = await client.get(f"/v1/kv/k?index={index}&wait=1s")
    assert 1.0 <= trio.current_time() - started < 1.5
    assert r.status_code == 200 and await _index(r) == index


async def test_hash_blocking_agent_service(client: httpx.AsyncClient) -> None:
    await client.put("/v1/agent/service/register", json={"Name": "web", "Port": 80})
    digest = (await client.get("/v1/agent/service/web")).headers["X-Consul-ContentHash"]
    result: list[httpx.Response] = []

    async def watch() -> None:
        result.append(await client.get(f"/v1/agent/service/web?hash={digest}&wait=10s"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.sleep(0.1)
        await client.put("/v1/agent/service/register", json={"Name": "web", "Port": 81})
    assert result[0].json()["Port"] == 81
    assert result[0].headers["X-Consul-ContentHash"] != digest


async def test_a_thousand_watchers_are_woken_by_one_kv_write(registry: Registry) -> None:
    """1000 parked blocking queries on one key (one trio task each, no polling), all answered
    with the new index by a single write. Raw sockets on the client side: httpx's pool, not the
    server, is the bottleneck at this scale."""
    watchers = _affordable_connections(1000)
    await registry.client.put("/v1/kv/meshd/config/routes", content=b"old")
    index = await _index(await registry.client.get("/v1/kv/meshd/config/routes"))
    token = f"X-Consul-Token: {registry.token}\r\n" if registry.token else ""
    request = (f"GET /v1/kv/meshd/config/routes?index={index}&wait=30s HTTP/1.1\r\n"
               f"Host: registry\r\n{token}\r\n").encode()
    answered: list[tuple[float, bytes]] = []
    port = httpx.URL(registry.url).port or 80
    host = httpx.URL(registry.url).host

    async def watch() -> None:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(request)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(65536)
                assert chunk
                head += chunk
            answered.append((trio.current_time(), head))

    async with trio.open_nursery() as nursery:
        for _ in range(watchers):
            nursery.start_soon(watch)
        await trio.sleep(1.0)
        assert answered == []  # all parked
        started = trio.current_time()
        r = await registry.client.put("/v1/kv/meshd/config/routes", content=b"new")
        assert r.json() is True
    new_index = await _index(await registry.client.get("/v1/kv/meshd/config/routes"))
    assert new_index > index
    assert len(answered) == watchers
    for _, head in answered:
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"X-Consul-Index: {new_index}\r\n".encode() in head
    last = max(t for t, _ in answered) - started
    assert last < 2.0, f"the last of {watchers} watchers returned after {last:.2f}s"
