"""Real parts on loopback for identity tests at the daemon level: the embedded registry, the CA
(with a short leaf lifetime, so renewals happen within a test), daemons, a small app."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from net_testing import free_port

from meshd.ca.server import serve_ca
from meshd.ca.store import TokenStore, init_ca
from meshd.config.parse import parse_host_config, routes_to_data
from meshd.config.schema import HostConfig, RouteTable
from meshd.daemon import Daemon
from meshd.httpd import Request, Response, serve_http
from meshd.registry.server import RegistryConfig, listen_port, serve_registry
from meshd.registry.watch import ROUTES_KEY

TD = "id.mesh"


@dataclass
class DaemonMesh:
    registry_url: str
    ca_url: str
    fingerprint: str
    ca_dir: Path
    tmp: Path
    http: httpx.AsyncClient

    def host_config(self, node: str, address: str, services: list[dict[str, Any]],
                    **extra: Any) -> HostConfig:
        base = self.tmp / node
        if not base.exists():
            base.mkdir()
            token, _ = TokenStore(self.ca_dir).mint(
                node, [s["name"] for s in services], now=datetime.now(UTC),
                ttl=timedelta(hours=1))
            (base / "join-token").write_text(token + "\n")
        return parse_host_config({
            "node": node, "address": address, "trust_domain": TD,
            "registry": self.registry_url, "state_dir": "state",
            "ca": {"url": self.ca_url, "fingerprint": self.fingerprint,
                   "token_file": "join-token"},
            "inbound": {"port": free_port(address)},
            "admin": {"address": f"{address}:{free_port(address)}"},
            "services": services,
        } | extra, f"{node}.toml", base)

    async def put_routes(self, data: dict[str, Any]) -> None:
        r = await self.http.put(f"{self.registry_url}/v1/kv/{ROUTES_KEY}",
                                content=json.dumps(data).encode())
        assert r.status_code == 200


async def open_mesh(nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient,
                    leaf_lifetime: timedelta = timedelta(hours=24)) -> DaemonMesh:
    listeners = await nursery.start(serve_registry, RegistryConfig(host="127.0.0.1", port=0))
    registry_url = f"http://127.0.0.1:{listen_port(listeners)}"
    ca_dir = tmp_path / "ca"
    init_ca(ca_dir, TD, now=datetime.now(UTC), leaf_lifetime=leaf_lifetime)
    endpoint = await nursery.start(partial(serve_ca, ca_dir, "127.0.0.1", 0))
    return DaemonMesh(registry_url, endpoint.url, endpoint.fingerprint, ca_dir, tmp_path, http)


def single_route(service: str, version: str) -> dict[str, Any]:
    return routes_to_data(RouteTable()) | {"destinations": {service: {
        "subsets": {version: {"version": version}}, "split": {version: 100}, "timeout": 5.0}}}


async def app(address: str, port: int, name: str,
              *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(request: Request) -> Response:
        if request.path == "/healthz":
            return Response.text("ok")
        return Response.json({"service": name, "source": request.header("x-meshd-source")})

    await serve_http(handle, address, port, task_status=task_status)


async def start_daemon(nursery: trio.Nursery, config: HostConfig) -> Daemon:
    daemon = Daemon(config)
    with trio.fail_after(20):
        await nursery.start(daemon.run)
    return daemon


async def wait_for(predicate: Callable[[], Awaitable[bool]], limit: float = 10) -> None:
    with trio.fail_after(limit):
        while not await predicate():  # noqa: ASYNC110 - polls other parts over sockets
            await trio.sleep(0.05)


async def until(predicate: Callable[[], bool], every: float = 0.1) -> None:
    """Wait for a condition on state that several tasks change (renewal status, bundles);
    the caller bounds the wait."""
    while not predicate():  # noqa: ASYNC110 - many tasks and processes change what it reads
        await trio.sleep(every)
