"""Fixtures for the registry tests: a real server on a loopback port, and an httpx client.

By default the embedded registry runs in-process on port 0. With ``CONSUL_HTTP_ADDR`` set (and
``CONSUL_HTTP_TOKEN`` if its ACLs are on) the same tests run against that Consul instead, e.g.
``consul agent -dev``: point them at a throwaway agent, since every test starts by wiping its KV
store, sessions, agent services and checks and catalog-only nodes. Tests that need the embedded
server itself (restarts, kill -9, its data files, its timers shortened for test speed, ACL flags)
are marked ``embedded_only`` and skipped in that mode, with the reason.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import trio

from meshd.registry.embedded.server import RegistryConfig, listen_port, serve_registry

CONSUL_ADDR = os.environ.get("CONSUL_HTTP_ADDR", "")
CONSUL_TOKEN = os.environ.get("CONSUL_HTTP_TOKEN", "")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "embedded_only(reason): needs the embedded registry, skipped when the tests "
                   "run against a real Consul (CONSUL_HTTP_ADDR)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("embedded_only")
    if marker is not None and CONSUL_ADDR:
        reason = marker.args[0] if marker.args else "needs the embedded registry"
        pytest.skip(f"CONSUL_HTTP_ADDR is set: {reason}")


def consul_url(addr: str) -> str:
    return addr.rstrip("/") if "://" in addr else f"http://{addr}"


@dataclass
class Registry:
    client: httpx.AsyncClient
    port: int
    url: str
    node: str = "meshd-registry"
    embedded: bool = True
    token: str = ""

    @property
    def host(self) -> str:
        return httpx.URL(self.url).host


async def start_registry(nursery: trio.Nursery, **config: object) -> Registry:
    cfg = RegistryConfig(host="127.0.0.1", port=0, **config)  # type: ignore[arg-type]
    listeners = await nursery.start(serve_registry, cfg)
    port = listen_port(listeners)
    url = f"http://127.0.0.1:{port}"
    client = httpx.AsyncClient(base_url=url, timeout=30, trust_env=False)
    return Registry(client, port, url, node=cfg.node_name)


async def _wipe(client: httpx.AsyncClient, node: str) -> None:
    """Bring a real Consul back to a fresh agent's state (our tests' writes only)."""
    await client.delete("/v1/kv/?recurse")
    for session in (await client.get("/v1/session/list")).json():
        await client.put(f"/v1/session/destroy/{session['ID']}")
    for service_id in (await client.get("/v1/agent/services")).json():
        await client.put(f"/v1/agent/service/deregister/{service_id}")
    for check_id in (await client.get("/v1/agent/checks")).json():
        await client.put(f"/v1/agent/check/deregister/{check_id}")
    await client.put("/v1/agent/maintenance?enable=false")
    for other in (await client.get("/v1/catalog/nodes")).json():
        if other["Node"] != node:
            await client.put("/v1/catalog/deregister", json={"Node": other["Node"]})


async def external_registry() -> Registry:
    url = consul_url(CONSUL_ADDR)
    headers = {"X-Consul-Token": CONSUL_TOKEN} if CONSUL_TOKEN else {}
    client = httpx.AsyncClient(base_url=url, timeout=30, trust_env=False, headers=headers)
    me = (await client.get("/v1/agent/self")).json()
    node = me["Config"]["NodeName"]
    await _wipe(client, node)
    port = httpx.URL(url).port or 8500
    return Registry(client, port, url, node=node, embedded=False, token=CONSUL_TOKEN)


@pytest.fixture
async def registry(nursery: trio.Nursery) -> AsyncIterator[Registry]:
    reg = await external_registry() if CONSUL_ADDR else await start_registry(nursery)
    try:
        yield reg
        if not reg.embedded:
            await _wipe(reg.client, reg.node)
    finally:
        await reg.client.aclose()


@pytest.fixture
async def client(registry: Registry) -> httpx.AsyncClient:
    return registry.client
