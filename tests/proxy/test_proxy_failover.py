"""Dead apps over real loopback: a peer meshd whose app refuses says so (503, ``x-meshd-error:
app-connect-failed``), the caller's meshd retries that on another endpoint for any method, a
subset without healthy endpoints fails over in its declared order, and locality prefers the
caller's zone. app → meshd a → mTLS → meshd b1/b2/b3 (apps that misbehave on demand) or a meshd
whose app is gone."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import trio
from proxy_mesh_testing import Farm, Host, make_host
from proxy_testing import sample

from meshd.config.schema import LocalService, Upstream

FAILOVER = {"subsets": {"v1": {"version": "v1", "failover": ["v2"]},
                        "v2": {"version": "v2", "failover": ["v1"]}},
            "split": {"v1": 100}}


async def _refused_port() -> int:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()  # bound, never listening: connections are refused
    return port


async def _host_without_app(farm: Farm, nursery: trio.Nursery, name: str,
                            version: str = "v1") -> Host:
    """A live meshd for payments whose app is gone (its port refuses connections)."""
    host = make_host(farm.ca, farm.root, name,
                     [LocalService("payments", await _refused_port(), version=version)])
    await nursery.start(host.proxy.run)
    farm.hosts[name] = host
    return host


def _retries(farm: Farm, reason: str) -> float:
    return sample(farm.a.metrics, "meshd_retries_total", destination="payments", reason=reason)


async def test_an_app_that_refuses_is_retried_elsewhere_for_any_method(
        farm: Farm, nursery: trio.Nursery) -> None:
    dead = await _host_without_app(farm, nursery, "dead")
    farm.set_endpoints(farm.endpoint("dead"), farm.endpoint("b2"))
    farm.set_routes({"split": {"v1": 100}})  # no retries declared
    body = os.urandom(10_000)
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        for i in range(6):
            response = await (client.post("/sha", content=body) if i % 2 else
                              client.post("/charge"))
            assert response.status_code == 200, response.text
            assert "x-meshd-error" not in response.headers
    assert [s["size"] for s in farm.apps["b2"].seen] == [0, 10_000] * 3
    # round robin sent every other request to the dead app's meshd, which said so
    refused = sample(dead.metrics, "meshd_connection_errors_total", direction="inbound",
                     reason="app_connect_failed")
    assert refused == 3 and _retries(farm, "app-connect-failed") == 3
    assert sample(dead.metrics, "meshd_requests_total", direction="inbound", source="web",
                  destination="payments", subset="v1", code="503") == 3


async def test_an_answer_from_a_dead_app_host_ejects_it_as_a_connect_failure(
        farm: Farm, nursery: trio.Nursery) -> None:
    await _host_without_app(farm, nursery, "dead")
    farm.set_endpoints(farm.endpoint("dead"), farm.endpoint("b2"))
    farm.set_routes({"split": {"v1": 100}, "policy": {"outlier_detection": {
        "consecutive_connect_failures": 2, "max_ejection_percent": 50}}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        for _ in range(8):
            assert (await client.get("/version")).status_code == 200
    state = farm.state("dead")
    assert state["ejected"] is True and state["ejection_reason"] == "connect-failure"
    assert _retries(farm, "app-connect-failed") == 2  # then it was out of the rotation


async def test_an_app_cannot_claim_it_never_saw_a_request(farm: Farm) -> None:
    liar = farm.apps["b1"]
    liar.status = 503
    liar.extra_headers = [("x-meshd-error", "app-connect-failed"), ("x-meshd-reason", "lies")]
    farm.set_endpoints(farm.endpoint("b1"), farm.endpoint("b2"))
    farm.set_routes({"split": {"v1": 100}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        response = await client.post("/charge", content=b"{}")  # round robin: b1 first
    # the app saw it, so it is not sent again: its 503 is relayed, without meshd's headers
    assert response.status_code == 503
    assert "x-meshd-error" not in response.headers and "x-meshd-reason" not in response.headers
    assert (liar.requests, farm.apps["b2"].requests) == (1, 0)


async def test_a_subset_without_healthy_endpoints_fails_over(farm: Farm) -> None:
    sick = (farm.endpoint("b1", healthy=False), farm.endpoint("b2", healthy=False))
    farm.set_endpoints(*sick, farm.endpoint("b3"))
    farm.set_routes({"split": {"v1": 100}})  # no failover declared: 503 with a code
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        response = await client.post("/charge", content=b"x" * 100)
        assert response.status_code == 503
        assert response.headers["x-meshd-error"] == "no-healthy-endpoint"
        assert response.headers["x-meshd-reason"] == \
            "no healthy endpoint of payments in subset v1"
        farm.set_routes(FAILOVER)
        for _ in range(3):
            response = await client.get("/version")
            assert response.status_code == 200 and response.json()["version"] == "v2"
    m = farm.a.metrics
    assert sample(m, "meshd_failovers_total", destination="payments", subset="v1",
                  to="v2") == 3
    assert sample(m, "meshd_requests_total", direction="outbound", source="web",
                  destination="payments", subset="v2", code="200") == 3


async def test_retries_of_a_dead_subset_continue_into_its_failover(
        farm: Farm, nursery: trio.Nursery) -> None:
    """The whole of v1 died and the registry has not noticed: a request tries both v1
    endpoints (the floor of two retries), then v2, and gets its answer."""
    for name in ("dead1", "dead2"):
        await _host_without_app(farm, nursery, name)
    farm.set_endpoints(farm.endpoint("dead1"), farm.endpoint("dead2"), farm.endpoint("b3"))
    farm.set_routes(FAILOVER | {"retries": {"attempts": 1, "retry_on": ["reset"]}})
    body = os.urandom(5000)
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        for _ in range(3):
            response = await client.post("/sha", content=body)
            assert response.status_code == 200 and response.json()["version"] == "v2"
    assert _retries(farm, "app-connect-failed") == 6
    assert sample(farm.a.metrics, "meshd_failovers_total", destination="payments",
                  subset="v1", to="v2") == 3


async def test_connect_failures_to_the_peer_are_retried_without_a_policy(farm: Farm) -> None:
    farm.set_endpoints(farm.endpoint("gone", port=await _refused_port()), farm.endpoint("b2"))
    farm.set_routes({"split": {"v1": 100}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        for _ in range(4):
            assert (await client.post("/charge", content=b"{}")).status_code == 200
    assert _retries(farm, "connect-failure") == 2
    farm.set_routes({"split": {"v1": 100}, "retries": {"attempts": 0}})  # turned off
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        codes = sorted([(await client.get("/version")).status_code for _ in range(2)])
    assert codes == [200, 503]


async def test_locality_keeps_traffic_in_the_callers_zone(
        farm: Farm, tmp_path: Path, nursery: trio.Nursery) -> None:
    caller = make_host(farm.ca, tmp_path, "z", [LocalService("web", 1, upstreams=(
        Upstream("payments", 0),))], farm.view, labels=(("zone", "z2"),))
    await nursery.start(caller.proxy.run)
    host, port = caller.proxy.outbound_address("web", "payments")
    farm.set_routes({"split": {"v1": 100}, "policy": {"locality": ["zone"]}})
    far, near = farm.endpoint("b1", labels=(("zone", "z1"),)), farm.endpoint("b2", labels=(
        ("zone", "z2"),))
    farm.set_endpoints(far, near)
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
        for _ in range(4):
            assert (await client.get("/version")).status_code == 200
        assert (farm.apps["b1"].requests, farm.apps["b2"].requests) == (0, 4)
        farm.set_endpoints(far, farm.endpoint("b2", healthy=False, labels=(("zone", "z2"),)))
        for _ in range(2):  # nothing healthy left in z2: the other zone takes it
            assert (await client.get("/version")).status_code == 200
        assert farm.apps["b1"].requests == 2
