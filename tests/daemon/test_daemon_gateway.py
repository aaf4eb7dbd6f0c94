"""A gateway-only meshd, for real: it joins with a token naming its gateway, registers it as an
ingress gateway, shows it in /v1/state, and carries outside requests to a mesh service over
mTLS as the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from mesh_testing import Mesh, open_mesh, start_daemon, wait_for
from net_testing import free_port

from meshd.ca.store import TokenStore
from meshd.config.parse import parse_host_config
from meshd.httpd import Request, Response, serve_http

TD = "gw.mesh"


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield await open_mesh(nursery, tmp_path, http, TD)


async def web_app(address: str, port: int, *,
                  task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(request: Request) -> Response:
        return Response.json({"service": "web", "source": request.header("x-meshd-source"),
                              "proto": request.header("x-forwarded-proto"),
                              "path": request.path})

    await serve_http(handle, address, port, task_status=task_status)


async def test_a_gateway_only_meshd_registers_and_carries_outside_requests(
        mesh: Mesh, nursery: trio.Nursery, tmp_path: Path) -> None:
    web_port = free_port("127.0.0.1")
    await nursery.start(web_app, "127.0.0.1", web_port)
    b = mesh.host_config("host-b", "127.0.0.3", [
        {"name": "web", "port": web_port, "address": "127.0.0.1",
         "health": {"http": "/", "interval": "1s"}}])
    await mesh.put_routes({"default_policy": "deny", "destinations": {"web": {
        "authorization": {"rules": [{"name": "edge-only", "action": "allow",
                                     "from": ["edge"]}]}}}})
    # the gateway's host: no local service, a join token naming the gateway
    base = tmp_path / "host-g"
    base.mkdir()
    token, _ = TokenStore(mesh.ca_dir).mint("host-g", ["edge"], now=datetime.now(UTC),
                                            ttl=timedelta(hours=1))
    (base / "join-token").write_text(token + "\n")
    outside = free_port("127.0.0.1")
    admin = free_port("127.0.0.4")
    g = parse_host_config({
        "node": "host-g", "address": "127.0.0.4", "trust_domain": TD,
        "registry": mesh.registry_url, "state_dir": "state",
        "ca": {"url": mesh.ca_url, "fingerprint": mesh.fingerprint,
               "token_file": "join-token"},
        "inbound": {"port": free_port("127.0.0.4")},
        "admin": {"address": f"127.0.0.4:{admin}"},
        "gateways": [{"name": "edge",
                      "listeners": [{"port": outside, "address": "127.0.0.1"}],
                      "routes": [{"service": "web"}]}],
    }, "host-g.toml", base)
    await start_daemon(nursery, b)
    await start_daemon(nursery, g)

    async def through_the_gateway() -> bool:
        try:
            r = await mesh.http.get(f"http://127.0.0.1:{outside}/shop")
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    await wait_for(through_the_gateway, 15)
    r = await mesh.http.get(f"http://127.0.0.1:{outside}/shop")
    assert r.json() == {"service": "web", "source": "edge", "proto": "http", "path": "/shop"}

    # registered as Consul registers an ingress gateway, its check fed by meshd
    async def registered() -> bool:
        r = await mesh.http.get(f"{mesh.registry_url}/v1/health/service/edge")
        entries = r.json() if r.status_code == 200 else []
        return bool(entries) and all(c["Status"] == "passing"
                                     for e in entries for c in e["Checks"]
                                     if c["CheckID"].startswith("service:"))

    await wait_for(registered, 15)
    entry = (await mesh.http.get(f"{mesh.registry_url}/v1/health/service/edge")).json()[0]
    assert entry["Service"]["Kind"] == "ingress-gateway"
    assert entry["Service"]["Port"] == outside
    assert entry["Service"]["Meta"]["gateway-routes"] == "web"
    state = (await mesh.http.get(f"http://127.0.0.4:{admin}/v1/state")).json()
    (gateway,) = state["gateways"]
    assert gateway["name"] == "edge" and gateway["spiffe_id"] == f"spiffe://{TD}/svc/edge"
    assert gateway["routes"] == [{"hosts": ["*"], "path_prefix": "/", "service": "web"}]
    assert gateway["health"] == "passing"
    assert "web" in state["destinations"]
