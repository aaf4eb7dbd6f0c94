"""Fixtures for the embedded registry: a real server on a loopback port, and an httpx client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import trio

from meshd.registry.server import RegistryConfig, listen_port, serve_registry


@dataclass
class Registry:
    client: httpx.AsyncClient
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_registry(nursery: trio.Nursery, **config: object) -> Registry:
    cfg = RegistryConfig(host="127.0.0.1", port=0, **config)  # type: ignore[arg-type]
    listeners = await nursery.start(serve_registry, cfg)
    port = listen_port(listeners)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
    return Registry(client, port)


@pytest.fixture
async def registry(nursery: trio.Nursery) -> AsyncIterator[Registry]:
    reg = await start_registry(nursery)
    async with reg.client:
        yield reg


@pytest.fixture
async def client(registry: Registry) -> httpx.AsyncClient:
    return registry.client
