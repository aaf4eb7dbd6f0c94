"""health/connect and catalog/connect: the connect-proxy instances fronting a service, with their
own per-destination blocking index (meshd discovers endpoints through these)."""

from __future__ import annotations

import httpx
import trio
from registry_testing import Registry


def _proxy(node: str, dest: str, port: int, version: str) -> dict[str, object]:
    return {
        "ID": f"{dest}-{node}-sidecar-proxy", "Name": f"{dest}-sidecar-proxy",
        "Kind": "connect-proxy", "Address": "127.0.0.3", "Port": port,
        "Meta": {"version": version},
        "Proxy": {"DestinationServiceName": dest, "DestinationServiceID": f"{dest}-{node}"},
        "Check": {"CheckID": f"service:{dest}-{node}-sidecar-proxy", "TTL": "30s",
                  "Status": "passing"},
    }


async def test_health_connect_lists_proxies_and_blocks(registry: Registry) -> None:
    c = registry.client
    r = await c.get("/v1/health/connect/payments")
    assert r.status_code == 200 and r.json() == []
    index = int(r.headers["X-Consul-Index"])
    assert index >= 1

    woke: list[httpx.Response] = []

    async def block() -> None:
        woke.append(await c.get("/v1/health/connect/payments",
                                params={"index": str(index), "wait": "5s"}))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(block)
        await trio.sleep(0.2)
        # an unrelated registration does not wake the watcher
        await c.put("/v1/agent/service/register", json={"Name": "cart", "Port": 1})
        await c.put("/v1/agent/service/register", json=_proxy("b", "cart", 15001, "v1"))
        await trio.sleep(0.2)
        assert woke == []
        await c.put("/v1/agent/service/register",
                    json={"Name": "payments", "ID": "payments-b", "Port": 9001})
        await c.put("/v1/agent/service/register", json=_proxy("b", "payments", 15001, "v2"))
    answer = woke[0]
    assert int(answer.headers["X-Consul-Index"]) > index
    entries = answer.json()
    assert len(entries) == 1
    svc = entries[0]["Service"]
    assert svc["Kind"] == "connect-proxy" and svc["Port"] == 15001
    assert svc["Proxy"]["DestinationServiceName"] == "payments"
    assert {c["CheckID"] for c in entries[0]["Checks"]} == {
        "serfHealth", "service:payments-b-sidecar-proxy"}

    catalog = (await c.get("/v1/catalog/connect/payments")).json()
    assert [e["ServiceID"] for e in catalog] == ["payments-b-sidecar-proxy"]

    # passing filter follows the proxy's own check; deregistering removes it and bumps the index
    await c.put("/v1/agent/check/fail/service:payments-b-sidecar-proxy")
    assert (await c.get("/v1/health/connect/payments", params={"passing": "1"})).json() == []
    before = int((await c.get("/v1/health/connect/payments")).headers["X-Consul-Index"])
    await c.put("/v1/agent/service/deregister/payments-b-sidecar-proxy")
    r = await c.get("/v1/health/connect/payments")
    assert r.json() == [] and int(r.headers["X-Consul-Index"]) > before
