"""The registry a test talks to: the embedded one in-process on a loopback port, or the Consul
``CONSUL_HTTP_ADDR`` names (wiped back to a fresh agent's state)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import httpx
import trio

from meshd.registry.embedded.server import RegistryConfig, listen_port, serve_registry

CONSUL_ADDR = os.environ.get("CONSUL_HTTP_ADDR", "")
CONSUL_TOKEN = os.environ.get("CONSUL_HTTP_TOKEN", "")


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
