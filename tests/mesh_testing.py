"""Real parts on loopback for daemon-level tests, shared by every test directory: the embedded
registry and the CA in-process, host configs with a freshly minted join token, daemons started
and awaited. (``pyproject.toml`` puts ``tests/`` on ``sys.path``.)"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from net_testing import free_port
from operator_testing import issue_operator, signed_routes

from meshd.ca.server import serve_ca
from meshd.ca.store import TokenStore, init_ca
from meshd.config.parse import parse_host_config
from meshd.config.schema import HostConfig
from meshd.daemon.lifetime import Daemon
from meshd.registry.config_store import ROUTES_KEY
from meshd.registry.embedded.server import RegistryConfig, listen_port, serve_registry
from meshd.registry.operator_key import OperatorKey


@dataclass
class Mesh:
    registry_url: str
    ca_url: str
    fingerprint: str
    ca_dir: Path
    tmp: Path
    http: httpx.AsyncClient
    trust_domain: str
    _operator: OperatorKey | None = None

    @property
    def operator(self) -> OperatorKey:
        """An operator certificate of the mesh CA (issued on first use), as `meshd ca issue
        --operator ops` would: what signs the route tables the tests write."""
        if self._operator is None:
            self._operator = issue_operator(self.ca_dir, self.tmp / "operator")
        return self._operator

    def host_config(self, node: str, address: str, services: list[dict[str, Any]],
                    **extra: Any) -> HostConfig:
        """A host's config, with a join token for its services minted the first time the
        node is named (later calls reuse its directory and token)."""
        base = self.tmp / node
        if not base.exists():
            base.mkdir()
            token, _ = TokenStore(self.ca_dir).mint(
                node, [s["name"] for s in services], now=datetime.now(UTC),
                ttl=timedelta(hours=1))
            (base / "join-token").write_text(token + "\n")
        return parse_host_config({
            "node": node, "address": address, "trust_domain": self.trust_domain,
            "registry": self.registry_url, "state_dir": "state",
            "ca": {"url": self.ca_url, "fingerprint": self.fingerprint,
                   "token_file": "join-token"},
            "inbound": {"port": free_port(address)},
            "admin": {"address": f"{address}:{free_port(address)}"},
            "services": services,
        } | extra, f"{node}.toml", base)

    async def put_routes(self, data: dict[str, Any] | bytes) -> None:
        """Write a route table signed by ``operator`` (as given, even one every meshd refuses
        for its content), or ``bytes`` exactly as given (unsigned, garbage, a replay)."""
        body = data if isinstance(data, bytes) else signed_routes(data, self.operator)
        r = await self.http.put(f"{self.registry_url}/v1/kv/{ROUTES_KEY}", content=body)
        assert r.status_code == 200 and r.json() is True


async def open_mesh(nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient,
                    trust_domain: str,
                    leaf_lifetime: timedelta = timedelta(hours=24)) -> Mesh:
    listeners = await nursery.start(serve_registry, RegistryConfig(host="127.0.0.1", port=0))
    registry_url = f"http://127.0.0.1:{listen_port(listeners)}"
    ca_dir = tmp_path / "ca"
    init_ca(ca_dir, trust_domain, now=datetime.now(UTC), leaf_lifetime=leaf_lifetime)
    endpoint = await nursery.start(partial(serve_ca, ca_dir, "127.0.0.1", 0))
    return Mesh(registry_url, endpoint.url, endpoint.fingerprint, ca_dir, tmp_path, http,
                trust_domain)


async def start_daemon(nursery: trio.Nursery, config: HostConfig) -> Daemon:
    daemon = Daemon(config)
    with trio.fail_after(20):
        await nursery.start(daemon.run)
    return daemon


async def wait_for(predicate: Callable[[], Awaitable[bool]], limit: float = 10) -> None:
    """Poll another part's view over a socket until ``predicate`` holds (there is no event to
    wait on across a socket); bounded so a broken mesh fails the test, not hangs it."""
    with trio.fail_after(limit):
        while not await predicate():  # noqa: ASYNC110 - polls other parts over sockets
            await trio.sleep(0.05)
