"""A route's edge features arrive like every route: through the registry's KV watch, applied
live. Two real daemons in-process (host-a runs `web` calling `payments` on host-b), the
embedded registry and the CA; each table is signed and written to the KV, and the next request
after the meshd applied it follows it, with no restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from mesh_testing import Mesh, open_mesh, start_daemon, wait_for
from net_testing import free_port
from test_daemon import payments_app

TD = "test.mesh"
HOST_A = "127.0.20.12"
HOST_B = "127.0.20.13"


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield await open_mesh(nursery, tmp_path, http, TD)


def _table(**payments: Any) -> dict[str, Any]:
    return {"default_policy": "allow", "destinations": {"payments": {
        "subsets": {"v1": {"version": "v1"}}, "split": {"v1": 100}, **payments}}}


async def test_edge_features_from_the_kv_apply_to_the_next_request(
        mesh: Mesh, nursery: trio.Nursery) -> None:
    app_port = free_port(HOST_B)
    await nursery.start(payments_app, HOST_B, app_port, "v1")
    await mesh.put_routes(_table())
    b_conf = mesh.host_config("host-b", HOST_B, [{
        "name": "payments", "port": app_port, "address": HOST_B, "version": "v1",
        "health": {"none": True}}])
    upstream_port = free_port("127.0.0.1")
    a_conf = mesh.host_config("host-a", HOST_A, [{
        "name": "web", "port": free_port(HOST_A), "health": {"none": True},
        "upstreams": [{"name": "payments", "local_port": upstream_port}]}])
    await start_daemon(nursery, b_conf)
    await start_daemon(nursery, a_conf)
    url = f"http://127.0.0.1:{upstream_port}"
    admin = f"http://{a_conf.admin_host}:{a_conf.admin_port}"

    async def answered() -> bool:
        return (await mesh.http.get(f"{url}/pay")).status_code == 200
    await wait_for(answered)

    async def apply(table: dict[str, Any]) -> None:
        """Write ``table`` and wait until host-a has it in force."""
        before = (await mesh.http.get(f"{admin}/v1/state")).json()["generation"]
        await mesh.put_routes(table)

        async def applied() -> bool:
            state = (await mesh.http.get(f"{admin}/v1/state")).json()
            return bool(state["generation"] != before and not state["config_error"])
        await wait_for(applied)

    # a rate limit: the burst goes through, then 429
    await apply(_table(rate_limit={"requests_per_second": 0.1, "burst": 2}))
    statuses = [(await mesh.http.get(f"{url}/pay")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]

    # replaced by a rewrite and a redirect: the next request follows the new table
    await apply(_table(routes=[
        {"name": "api", "match": {"path": {"prefix": "/api/"}}, "rewrite": {"prefix": "/"}},
        {"name": "old", "match": {"path": {"prefix": "/old"}},
         "redirect": {"scheme": "https", "host": "shop.example"}}]))
    r = await mesh.http.get(f"{url}/api/pay")
    assert r.status_code == 200 and r.json()["path"] == "/pay"
    r = await mesh.http.get(f"{url}/old?x=1", follow_redirects=False)
    assert r.status_code == 301
    assert r.headers["location"] == "https://shop.example/old?x=1"
    state = (await mesh.http.get(f"{admin}/v1/state")).json()
    assert state["routes"]["destinations"]["payments"]["routes"][1]["redirect"] == {
        "status": 301, "scheme": "https", "host": "shop.example"}
    metrics = (await mesh.http.get(f"{admin}/metrics")).text
    assert 'meshd_rate_limited_total{destination="payments",route="default"} 1.0' in metrics
