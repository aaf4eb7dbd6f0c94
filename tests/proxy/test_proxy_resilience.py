"""Retries, timeouts, outlier ejection, circuit breaking over real loopback: app → meshd a →
mTLS → meshd b1/b2/b3 → apps that misbehave on demand (slow, 5xx, silent, dropping)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import trio
from proxy_mesh_testing import Farm
from proxy_testing import ResettingPeer, sample

RETRY_5XX = {"attempts": 2, "retry_on": ["5xx"]}


def _retries(m: Farm, reason: str) -> float:
    return sample(m.a.metrics, "meshd_retries_total", destination="payments", reason=reason)


async def test_retry_on_503_hides_a_failing_endpoint(farm: Farm) -> None:
    farm.apps["b1"].status = 503
    farm.set_routes({"split": {"v1": 100}, "retries": RETRY_5XX})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        for _ in range(10):
            response = await client.get("/version")
            assert response.status_code == 200
            assert response.json()["version"] == "v1"
    # every request that started on b1 was retried on b2 (rotation is per try)
    assert farm.apps["b2"].requests == 10
    assert farm.apps["b1"].requests >= 1
    assert _retries(farm, "503") == farm.apps["b1"].requests


async def test_no_retry_configured_relays_the_5xx(farm: Farm) -> None:
    farm.apps["b1"].status = 503
    farm.set_endpoints(farm.endpoint("b1"))
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        assert (await client.get("/version")).status_code == 503
    assert farm.apps["b1"].requests == 1


async def test_retries_stop_after_attempts(farm: Farm) -> None:
    for name in ("b1", "b2"):
        farm.apps[name].status = 500
    farm.set_routes({"split": {"v1": 100}, "retries": {"attempts": 3, "retry_on": ["5xx"]}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        response = await client.get("/version")
    assert response.status_code == 500  # the last try's answer, relayed
    assert farm.apps["b1"].requests + farm.apps["b2"].requests == 4
    assert _retries(farm, "500") == 3


async def test_small_post_body_is_replayed_large_one_is_not(farm: Farm) -> None:
    farm.apps["b1"].status = 503
    farm.set_routes({"split": {"v1": 100}, "retries": RETRY_5XX})
    small = os.urandom(20_000)
    large = os.urandom(300_000)  # over the 64 KiB replay limit
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        first = await client.post("/sha", content=small)  # round robin: b1 first, then b2
        assert first.status_code == 200
        assert first.json()["sha256"] == hashlib.sha256(small).hexdigest()
        second = await client.post("/sha", content=large)  # b2 first: fine
        assert second.status_code == 200
        third = await client.post("/sha", content=large)  # b1 first: 503, body not kept
        assert third.status_code == 503
    b1 = farm.apps["b1"].seen
    assert [s["size"] for s in b1] == [len(small), len(large)]
    assert _retries(farm, "503") == 1


async def test_body_less_post_is_not_retried_after_an_answer(farm: Farm) -> None:
    farm.apps["b1"].status = 503
    farm.set_endpoints(farm.endpoint("b1"), farm.endpoint("b2"))
    farm.set_routes({"split": {"v1": 100}, "retries": RETRY_5XX})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        assert (await client.post("/charge")).status_code == 503
        assert (await client.post("/charge")).status_code == 200  # b2's turn


async def test_per_try_timeout_moves_on_to_another_endpoint(farm: Farm) -> None:
    farm.apps["b1"].hang = True
    farm.set_routes({"split": {"v1": 100}, "timeout": "5s",
                     "retries": {"attempts": 1, "per_try_timeout": "200ms",
                                 "retry_on": ["timeout"]}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        start = trio.current_time()
        for _ in range(2):  # one of the two starts on b1
            assert (await client.get("/version")).status_code == 200
        assert trio.current_time() - start < 2
    assert _retries(farm, "timeout") == 1


async def test_per_try_timeout_does_not_cut_a_response_in_progress(farm: Farm) -> None:
    farm.set_endpoints(farm.endpoint("b1"))
    farm.set_routes({"split": {"v1": 100},
                     "retries": {"attempts": 1, "per_try_timeout": "300ms"}})
    async with httpx.AsyncClient(base_url=farm.url(), timeout=30) as client:
        response = await client.get("/big", params={"n": 30_000_000})
    assert response.status_code == 200 and len(response.content) == 30_000_000


async def test_whole_request_timeout_bounds_all_tries(farm: Farm) -> None:
    for app in farm.apps.values():
        app.hang = True
    farm.set_routes({"split": {"v1": 100}, "timeout": "600ms",
                     "retries": {"attempts": 5, "per_try_timeout": "250ms",
                                 "retry_on": ["timeout"]}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        start = trio.current_time()
        response = await client.get("/version")
        elapsed = trio.current_time() - start
    assert response.status_code == 504
    assert "within 0.6s" in response.text
    assert 0.5 < elapsed < 1.5


async def test_per_try_timeout_exhausted_is_504(farm: Farm) -> None:
    farm.apps["b1"].hang = True
    farm.set_endpoints(farm.endpoint("b1"))
    farm.set_routes({"split": {"v1": 100},
                     "retries": {"attempts": 1, "per_try_timeout": "150ms",
                                 "retry_on": ["timeout"]}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        response = await client.get("/version")
    assert response.status_code == 504
    assert "per-try timeout" in response.text


async def test_connect_failure_is_retried_and_ejects(farm: Farm) -> None:
    dead = trio.socket.socket()
    await dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there: connections are refused
    farm.set_endpoints(farm.endpoint("dead", port=dead_port), farm.endpoint("b2"))
    farm.set_routes({
        "split": {"v1": 100},
        "retries": {"attempts": 1, "retry_on": ["connect-failure"]},
        "policy": {"outlier_detection": {"consecutive_connect_failures": 1,
                                         "max_ejection_percent": 50}}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        for _ in range(6):
            assert (await client.get("/version")).status_code == 200
    m = farm.a.metrics
    # one refused connect, then the dead endpoint is out and never tried again
    assert sample(m, "meshd_connection_errors_total", direction="outbound",
                  reason="connect_failed") == 1
    assert sample(m, "meshd_outlier_ejections_total", destination="payments",
                  reason="connect-failure") == 1
    assert _retries(farm, "connect-failure") == 1
    assert farm.state("dead")["ejected"] is True


async def test_reset_by_the_peer_is_retried(farm: Farm, tmp_path: Path,
                                            nursery: trio.Nursery) -> None:
    peer = ResettingPeer(farm.ca, tmp_path / "resetter")
    await nursery.start(peer.serve)
    farm.set_endpoints(farm.endpoint("reset", port=peer.port), farm.endpoint("b2"))
    farm.set_routes({"split": {"v1": 100}, "retries": {"attempts": 1, "retry_on": ["reset"]}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        for _ in range(4):
            assert (await client.get("/version")).status_code == 200
    assert peer.requests == 2
    assert _retries(farm, "reset") == 2
    farm.set_routes({"split": {"v1": 100}})  # without retries the reset shows as a 502
    farm.set_endpoints(farm.endpoint("reset", port=peer.port))
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        response = await client.get("/version")
    assert response.status_code == 502 and "bad gateway" in response.text


async def test_ejection_then_readmission(farm: Farm) -> None:
    b1 = farm.apps["b1"]
    b1.status = 500
    farm.set_endpoints(farm.endpoint("b1"), farm.endpoint("b2"))
    farm.set_routes({"split": {"v1": 100}, "policy": {"outlier_detection": {
        "consecutive_5xx": 2, "base_ejection_time": "700ms", "max_ejection_percent": 50}}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        codes = [(await client.get("/version")).status_code for _ in range(10)]
        # b1 answered 500 twice (requests 1 and 3), then went out: b2 takes everything
        assert codes.count(500) == 2 and b1.requests == 2
        state = farm.state("b1")
        assert state["ejected"] is True and state["ejection_reason"] == "5xx"
        assert 0 < float(state["ejection_remaining_seconds"]) <= 0.7  # type: ignore[arg-type]
        assert sample(farm.a.metrics, "meshd_outlier_ejections_total",
                      destination="payments", reason="5xx") == 1
        b1.status = 200  # fixed while out
        await trio.sleep(0.8)
        assert farm.state("b1")["ejected"] is False
        for _ in range(4):
            assert (await client.get("/version")).status_code == 200
        assert b1.requests == 4  # back in the rotation


async def test_circuit_breaker_answers_503_at_once(farm: Farm) -> None:
    farm.set_endpoints(farm.endpoint("b1"))
    farm.set_routes({"split": {"v1": 100},
                     "policy": {"max_connections": 1, "max_pending_requests": 1}})
    results: list[tuple[int, str, float]] = []

    async def call(client: httpx.AsyncClient, path: str) -> None:
        start = trio.current_time()
        response = await client.get(path)
        results.append((response.status_code, response.headers.get("x-meshd-reason", ""),
                        trio.current_time() - start))

    limits = httpx.Limits(max_connections=10)
    async with (httpx.AsyncClient(base_url=farm.url(), limits=limits) as client,
                trio.open_nursery() as nursery):
        nursery.start_soon(call, client, "/slow?delay=0.6")
        await trio.sleep(0.2)
        nursery.start_soon(call, client, "/version")  # waits in line for the slot
        await trio.sleep(0.1)
        nursery.start_soon(call, client, "/version")  # nothing left: refused at once
    by_code = sorted(results)
    assert [code for code, _, _ in by_code] == [200, 200, 503]
    _, reason, elapsed = by_code[2]
    assert "circuit breaker open" in reason and elapsed < 0.2
    assert sample(farm.a.metrics, "meshd_circuit_breaker_rejections_total",
                  destination="payments") == 1
    assert farm.state("b1")["active_requests"] == 0


async def test_least_request_avoids_the_slow_endpoint(farm: Farm) -> None:
    farm.apps["b1"].delay = 0.5
    farm.set_endpoints(farm.endpoint("b1"), farm.endpoint("b2"))
    farm.set_routes({"split": {"v1": 100}, "policy": {"load_balancer": "least_request"}})
    limits = httpx.Limits(max_connections=20)
    async with (httpx.AsyncClient(base_url=farm.url(), limits=limits) as client,
                trio.open_nursery() as nursery):
        for _ in range(4):  # b1 gets stuck with some of these
            nursery.start_soon(client.get, "/version")
        await trio.sleep(0.2)
        assert farm.state("b1")["active_requests"] >= 1  # type: ignore[operator]
        before = farm.apps["b1"].requests
        for _ in range(10):  # while b1 is busy, b2 (idle) always wins the two choices
            assert (await client.get("/version")).status_code == 200
        assert farm.apps["b1"].requests == before



async def test_retry_budget_caps_retries_during_an_outage(farm: Farm) -> None:
    farm.apps["b1"].status = 503
    farm.set_endpoints(farm.endpoint("b1"))
    farm.set_routes({"split": {"v1": 100}, "retries": {"attempts": 3, "retry_on": ["503"]},
                     "policy": {"retry_budget": {"ratio": 0, "min_retries_per_second": 0.1}}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        codes = [(await client.get("/version")).status_code for _ in range(5)]
    assert codes == [503] * 5
    # one retry in a 10 s window (0.1/s), not 3 per request
    assert farm.apps["b1"].requests == 6
    assert _retries(farm, "503") == 1
    assert sample(farm.a.metrics, "meshd_retry_budget_exhausted_total",
                  destination="payments") == 5
