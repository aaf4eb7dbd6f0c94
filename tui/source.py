"""Where the console's data comes from, and where a split edit goes.

``RegistrySource`` finds every meshd through the registry: each mesh service instance is fronted
by a ``connect-proxy`` registration whose address is its host's, and the admin API listens on
``<that address>:<admin port>`` (the port is the same on every host in laptop mode and in the
shipped configs; the console takes it on its command line). Each refresh reads the registry and
every known meshd concurrently, each read bounded by a timeout well under the refresh interval.
``FixedSource`` replays recorded observations (tests, screenshots). Both run under asyncio (the
console's event loop); the registry is spoken to through meshd's own adapter."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from meshd.cli.status import admin_error
from meshd.cli.tui import TLS_OPTIONS
from meshd.config.parse import routes_to_data
from meshd.errors import MeshError
from meshd.registry.config_store import ROUTES_KEY, decode_routes
from meshd.registry.consul import ConsulClient
from tui.observe import (
    HostPoll,
    Instance,
    Observation,
    RegistryPoll,
    instances_from_health_connect,
    mesh_services,
)
from tui.prom import parse_metrics

DEFAULT_ADMIN_PORT = 15000
POLL_TIMEOUT = 0.8  # seconds per read: a refresh stays within its one-second interval


@dataclass(frozen=True)
class StoredRoutes:
    """The route table as stored, and the ModifyIndex a check-and-set write must name."""

    data: Mapping[str, Any]
    index: int  # 0: the key does not exist (a CAS write with 0 only creates)


class RouteStore(Protocol):
    async def read(self) -> StoredRoutes: ...

    async def write(self, data: Mapping[str, Any], cas: int) -> bool:
        """Write only if the stored ModifyIndex is still ``cas``; whether it was written."""
        ...


class MeshSource(Protocol):
    description: str
    routes: RouteStore

    async def poll(self) -> Observation: ...

    async def aclose(self) -> None: ...


def encode_routes(data: Mapping[str, Any]) -> bytes:
    """The bytes stored in KV: canonical JSON, exactly as ``meshd up`` writes them."""
    return json.dumps(dict(data)).encode()


class ConsulRouteStore:
    def __init__(self, consul: ConsulClient, key: str = ROUTES_KEY) -> None:
        self.consul = consul
        self.key = key

    async def read(self) -> StoredRoutes:
        answer = await self.consul.kv_get(self.key)
        if answer.data is None:
            return StoredRoutes({"destinations": {}}, 0)
        table = decode_routes(answer.data.value, f"registry kv {self.key}")
        return StoredRoutes(routes_to_data(table), answer.data.modify_index)

    async def write(self, data: Mapping[str, Any], cas: int) -> bool:
        return await self.consul.kv_put(self.key, encode_routes(data), cas=cas)


class MemoryRouteStore:
    """A route store in memory with the registry's check-and-set rule (fixed-data runs)."""

    def __init__(self, data: Mapping[str, Any], index: int = 1) -> None:
        self.stored = StoredRoutes(dict(data), index)
        self.writes = 0

    async def read(self) -> StoredRoutes:
        return self.stored

    async def write(self, data: Mapping[str, Any], cas: int) -> bool:
        if cas != self.stored.index:
            return False
        self.writes += 1
        self.stored = StoredRoutes(json.loads(encode_routes(data)), self.stored.index + 1)
        return True


def _reason(exc: BaseException, tls: bool = False, client_cert: bool = False) -> str:
    """Why a read failed, in the words ``meshd status`` uses (a refusal with the admin API's
    reason, a certificate that does not verify, a handshake broken off for want of an operator
    certificate)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, httpx.ConnectError) and not tls:
        return "connection refused"
    if isinstance(exc, httpx.HTTPError):
        return admin_error(exc, tls=tls, client_cert=client_cert, options=TLS_OPTIONS)
    return str(exc) or type(exc).__name__


class RegistrySource:
    def __init__(
        self, registry_url: str, admin_port: int = DEFAULT_ADMIN_PORT, *,
        timeout: float = POLL_TIMEOUT, admin_tls: ssl.SSLContext | None = None,
        admin_client_cert: bool = False, clock: Callable[[], float] = time.time,
    ) -> None:
        """``admin_tls``: read admin APIs over HTTPS with this context (``[admin] tls =
        true``); ``admin_client_cert``: it holds an operator certificate (for the reason shown
        when a host refuses)."""
        self.description = f"registry {registry_url.rstrip('/')}"
        self.consul = ConsulClient(registry_url)
        self.routes: RouteStore = ConsulRouteStore(self.consul)
        self.admin_port = admin_port
        self.timeout = timeout
        self.clock = clock
        self._scheme = "https" if admin_tls is not None else "http"
        self._client_cert = admin_client_cert
        self._http = httpx.AsyncClient(
            trust_env=False, verify=admin_tls if admin_tls is not None else True,
            timeout=httpx.Timeout(timeout), limits=httpx.Limits(max_keepalive_connections=64))
        self._hosts: dict[str, str] = {}  # admin HOST:PORT -> node name, every host ever seen
        self._limit = asyncio.Semaphore(32)

    async def aclose(self) -> None:
        await self._http.aclose()
        await self.consul.aclose()

    def admin_address(self, instance: Instance) -> str:
        host = f"[{instance.address}]" if ":" in instance.address else instance.address
        return f"{host}:{self.admin_port}"

    async def poll(self) -> Observation:
        at = self.clock()
        known = dict(self._hosts)
        registry, hosts = await asyncio.gather(
            self._poll_registry(at), self._poll_hosts(known, at))
        for inst in registry.instances:
            self._hosts.setdefault(self.admin_address(inst), inst.node)
        found = {a: n for a, n in self._hosts.items() if a not in known}
        if found:  # new hosts: read them now rather than a refresh later
            hosts += await self._poll_hosts(found, at)
        return Observation(at, registry, tuple(sorted(hosts, key=lambda h: h.admin)))

    async def _poll_registry(self, at: float) -> RegistryPoll:
        try:
            async with asyncio.timeout(self.timeout):
                services = mesh_services(await self.consul.catalog_services())
                answers = await asyncio.gather(
                    *(self.consul.health_connect(s) for s in services))
                kv = await self.consul.kv_get(ROUTES_KEY)
        except (MeshError, TimeoutError) as exc:
            return RegistryPoll(at, error=_reason(exc))
        instances = [i for s, a in zip(services, answers, strict=True)
                     for i in instances_from_health_connect(s, a.data)]
        routes: Mapping[str, Any] | None = None
        index = 0
        if kv.data is not None:
            index = kv.data.modify_index
            try:
                decoded = json.loads(kv.data.value)
                routes = decoded if isinstance(decoded, dict) else None
            except ValueError:
                routes = None
        return RegistryPoll(at, "", tuple(instances), routes, index)

    async def _poll_hosts(self, hosts: Mapping[str, str], at: float) -> list[HostPoll]:
        return list(await asyncio.gather(*(self._poll_host(a, n, at)
                                           for a, n in sorted(hosts.items()))))

    async def _poll_host(self, admin: str, node: str, at: float) -> HostPoll:
        base = f"{self._scheme}://{admin}"
        try:
            async with self._limit, asyncio.timeout(self.timeout):
                state_r, metrics_r = await asyncio.gather(
                    self._http.get(f"{base}/v1/state"), self._http.get(f"{base}/metrics"))
                state_r.raise_for_status()
                metrics_r.raise_for_status()
            state = state_r.json()
            if not isinstance(state, dict):
                raise ValueError("/v1/state is not a JSON object")
            metrics = parse_metrics(metrics_r.text)
        except (httpx.HTTPError, TimeoutError, ValueError) as exc:
            return HostPoll(admin, node, at, error=_reason(
                exc, self._scheme == "https", self._client_cert))
        return HostPoll(admin, str(state.get("node") or node), at, state, metrics)


class FixedSource:
    """Replays observations (the last one for ever): fixed data for tests and screenshots."""

    def __init__(self, observations: Sequence[Observation],
                 routes: RouteStore | None = None, description: str = "fixed data") -> None:
        if not observations:
            raise ValueError("FixedSource needs at least one observation")
        self.observations = list(observations)
        self.description = description
        self.routes: RouteStore = routes or MemoryRouteStore(
            observations[-1].registry.routes or {"destinations": {}},
            observations[-1].registry.routes_index or 1)
        self._next = 0

    async def poll(self) -> Observation:
        obs = self.observations[min(self._next, len(self.observations) - 1)]
        self._next += 1
        return obs

    async def aclose(self) -> None:
        return None
