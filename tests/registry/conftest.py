"""Fixtures for the registry tests: a real server on a loopback port, and an httpx client.

By default the embedded registry runs in-process on port 0. With ``CONSUL_HTTP_ADDR`` set (and
``CONSUL_HTTP_TOKEN`` if its ACLs are on) the same tests run against that Consul instead, e.g.
``consul agent -dev``: point them at a throwaway agent, since every test starts by wiping its KV
store, sessions, agent services and checks and catalog-only nodes. Tests that need the embedded
server itself (restarts, kill -9, its data files, its timers shortened for test speed, ACL flags)
are marked ``embedded_only`` and skipped in that mode, with the reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from registry_testing import CONSUL_ADDR, Registry, _wipe, external_registry, start_registry


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "embedded_only(reason): needs the embedded registry, skipped when the tests "
                   "run against a real Consul (CONSUL_HTTP_ADDR)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("embedded_only")
    if marker is not None and CONSUL_ADDR:
        reason = marker.args[0] if marker.args else "needs the embedded registry"
        pytest.skip(f"CONSUL_HTTP_ADDR is set: {reason}")


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
