"""Routes, fault injection, mirroring and hot reload over real loopback sockets."""

from __future__ import annotations

import os
import random
from collections import Counter
from typing import Any

import httpx
import trio
from proxy_mesh_testing import Farm, Mesh
from proxy_testing import eventually, read_until_eof, sample

from meshd.config.routes import parse_routes

ROUTED: dict[str, Any] = {
    "split": {"v1": 100},
    "routes": [
        {"name": "canary", "match": {"headers": {"x-canary": "1"}}, "split": {"v2": 100}},
        {"name": "beta", "match": {"path": {"prefix": "/beta"}, "method": ["GET", "POST"]},
         "split": {"v2": 100}},
        {"name": "teapot", "match": {"path": {"exact": "/teapot"}},
         "fault": {"abort_status": 418, "abort_percent": 100}},
        {"name": "slowed", "match": {"query": {"slow": {"present": True}}},
         "fault": {"delay": "300ms"}},
    ],
}


async def test_header_and_path_routes_pick_the_version(farm: Farm) -> None:
    farm.set_routes(ROUTED)
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        async def version(path: str, **headers: str) -> str:
            response = await client.get(path, headers=headers)
            assert response.status_code == 200
            return str(response.json()["version"])

        assert await version("/version") == "v1"
        assert await version("/version", **{"X-Canary": "1"}) == "v2"
        assert await version("/version", **{"x-canary": "0"}) == "v1"
        assert await version("/beta/version") == "v2"
        assert (await client.delete("/beta/x")).json()["version"] == "v1"  # method not listed
        assert await version("/betamax") == "v2"  # a prefix is a string prefix


async def test_fault_abort_and_delay(farm: Farm) -> None:
    farm.set_routes(ROUTED)
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        response = await client.get("/teapot")
        assert response.status_code == 418
        assert response.headers["x-meshd-reason"] == "fault injected by route teapot"
        # the connection survives an injected abort
        start = trio.current_time()
        assert (await client.get("/version?slow")).status_code == 200
        assert trio.current_time() - start >= 0.3
    assert sum(app.requests for app in farm.apps.values()) == 1  # the abort never left a
    m = farm.a.metrics
    assert sample(m, "meshd_faults_injected_total", destination="payments", route="teapot",
                  kind="abort") == 1
    assert sample(m, "meshd_faults_injected_total", destination="payments", route="slowed",
                  kind="delay") == 1
    assert sample(m, "meshd_requests_total", direction="outbound", source="web",
                  destination="payments", subset="v1", code="418") == 1


async def test_fault_percentages_hold_over_many_requests(farm: Farm) -> None:
    farm.set_routes({"split": {"v1": 100}, "fault": {"abort_status": 503, "abort_percent": 30}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        codes = Counter([(await client.get("/version")).status_code for _ in range(200)])
    assert 35 <= codes[503] <= 85  # binomial(200, 0.3): mean 60, sd 6.5


async def test_mirror_copies_without_touching_the_primary(farm: Farm) -> None:
    farm.set_routes({"split": {"v1": 100}, "mirror": {"subset": "v2", "percent": 100}})
    body = os.urandom(10_000)
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        response = await client.post("/sha", content=body)
        assert response.status_code == 200 and response.json()["version"] == "v1"
        assert "x-meshd-mirror" not in response.json()["headers"]
    await eventually(lambda: bool(farm.apps["b3"].seen))
    copy = farm.apps["b3"].seen[0]
    assert copy["headers"]["x-meshd-mirror"] == "1"
    assert copy["size"] == len(body) and copy["method"] == "POST"
    # counted once the copy's response is read, which may be just after the app saw it
    await eventually(lambda: sample(farm.a.metrics, "meshd_mirror_requests_total",
                                    destination="payments", subset="v2", result="sent") == 1)


async def test_a_hanging_mirror_never_slows_the_primary(farm: Farm) -> None:
    farm.apps["b3"].hang = True
    farm.set_routes({"split": {"v1": 100}, "timeout": "30s",
                     "mirror": {"subset": "v2", "percent": 100}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        start = trio.current_time()
        for _ in range(100):
            assert (await client.get("/version")).status_code == 200
        assert trio.current_time() - start < 5
    m = farm.a.metrics
    # 4 workers stuck on copies, 64 queued: the rest were dropped, none waited
    dropped = sample(m, "meshd_mirror_requests_total", destination="payments", subset="v2",
                     result="dropped")
    assert dropped == 100 - 64 - 4


async def test_large_bodies_are_not_mirrored(farm: Farm) -> None:
    farm.set_routes({"split": {"v1": 100}, "mirror": {"subset": "v2"}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        assert (await client.post("/sha", content=os.urandom(100_000))).status_code == 200
    assert sample(farm.a.metrics, "meshd_mirror_requests_total", destination="payments",
                  subset="v2", result="body_not_kept") == 1
    assert farm.apps["b3"].requests == 0


async def test_ring_hash_on_a_header_is_sticky(farm: Farm) -> None:
    farm.set_routes({"policy": {"load_balancer": "ring_hash", "ring_hash": {"header": "x-user"}}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        for user in ("ann", "bob", "cyd", "dan"):
            nodes = {(await client.get("/version", headers={"x-user": user})).json()["version"]
                     for _ in range(5)}
            assert len(nodes) == 1


async def test_route_tables_swapped_under_load_fail_no_request(farm: Farm) -> None:
    tables: list[dict[str, Any]] = [
        {"split": {"v1": 100}},
        {"split": {"v1": 50, "v2": 50}, "timeout": "5s"},
        {"split": {"v2": 100}, "policy": {"load_balancer": "least_request",
                                           "max_connections": 50}},
        {**ROUTED, "routes": ROUTED["routes"][:2]},
        {"split": {"v1": 90, "v2": 10}, "retries": {"attempts": 1},
         "policy": {"load_balancer": "random",
                    "outlier_detection": {"consecutive_5xx": 3}}},
        {"split": {"v1": 10, "v2": 90}, "policy": {"load_balancer": "ring_hash",
                                                   "ring_hash": {"source": True}}},
    ]
    rng = random.Random(5)
    codes: Counter[int] = Counter()
    done = trio.Event()

    async def swap() -> None:
        while not done.is_set():
            farm.set_routes(rng.choice(tables))
            await trio.sleep(0.002)

    async def client_loop(n: int) -> None:
        limits = httpx.Limits(max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=farm.url(), limits=limits) as client:
            for i in range(n):
                if i % 3 == 0:
                    response = await client.post("/sha", content=os.urandom(5000))
                else:
                    response = await client.get("/version", headers={"x-canary": str(i % 2)})
                codes[response.status_code] += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(swap)
        async with trio.open_nursery() as clients:
            for _ in range(8):
                clients.start_soon(client_loop, 40)
        done.set()
    assert codes == Counter({200: 320})
    assert farm.a.proxy.view.current.generation > 20


async def test_tcp_connect_failure_is_retried_on_another_endpoint(mesh: Mesh) -> None:
    dead = trio.socket.socket()
    await dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    mesh.view.set_routes(parse_routes({"destinations": {"ledger": {
        "retries": {"attempts": 1, "retry_on": ["connect-failure"]},
        "policy": {"outlier_detection": {"consecutive_connect_failures": 1}}}}}))
    mesh.set_endpoints("ledger", [mesh.endpoint("ledger", mesh.b, "v0", port=dead_port),
                                  mesh.endpoint("ledger", mesh.b)])
    host, port = mesh.a.proxy.outbound_address("web", "ledger")
    for _ in range(3):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(b"ping")
        await stream.send_eof()
        assert await read_until_eof(stream) == b"ping<eof>"
        await stream.aclose()
    assert sample(mesh.a.metrics, "meshd_retries_total", destination="ledger",
                  reason="connect-failure") == 1


async def test_a_backtracking_route_pattern_stalls_nothing(farm: Farm) -> None:
    """A route whose regex is ``/(a+)+`` (seconds per request with a backtracking engine on a
    28-byte path) against paths built to defeat it: RE2 answers at once, and a side client on
    the same meshd keeps being served meanwhile."""
    farm.set_routes({"split": {"v1": 100}, "routes": [
        {"name": "bomb", "match": {"path": {"regex": "/(a+)+"}}, "split": {"v2": 100}}]})
    side: list[int] = []
    async with httpx.AsyncClient(base_url=farm.url(), timeout=10) as client:
        async def side_client() -> None:
            for _ in range(50):
                side.append((await client.get("/version")).status_code)

        with trio.fail_after(20):  # a hang guard, not a speed test
            async with trio.open_nursery() as nursery:
                nursery.start_soon(side_client)
                for n in (28, 60, 2000):
                    miss = await client.get("/" + "a" * n + "!")  # no match: the split, v1
                    assert miss.json()["version"] == "v1"
                    hit = await client.get("/" + "a" * n)  # the whole path matches: v2
                    assert hit.json()["version"] == "v2"
    assert side == [200] * 50
