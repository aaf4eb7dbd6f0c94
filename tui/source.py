"""Where the console's data comes from, and where a split edit goes.

``RegistrySource`` finds every meshd through the registry: each mesh service instance is fronted
by a ``connect-proxy`` registration whose address is its host's, and whose Meta carries where
that host's admin API listens (``meshd-admin``, "HOST:PORT") and whether it needs an operator
certificate (``meshd-admin-tls``). A host that publishes nothing (an older meshd) is read at
``<its address>:<admin port>``, the port from the console's command line. An admin API on
loopback only is read when its host is this machine; otherwise it is shown unreachable with
that reason, without a timeout. Each refresh reads the registry and every known meshd
concurrently, each read bounded by a timeout well under the refresh interval.
``FixedSource`` replays recorded observations (tests, screenshots). Both run under asyncio (the
console's event loop) and go through meshd's own clients: the Consul adapter, the one admin
client (``meshd.admin.client``) and the one mesh config store (``meshd.registry.config_store``),
where a split edit is written with check-and-set."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from meshd.admin.client import DEFAULT_ADMIN_PORT, AdminClient, AdminError, Failure
from meshd.config.routes import parse_routes
from meshd.errors import MeshError
from meshd.registry.config_store import ROUTES_KEY, RouteConfigStore, encode_routes
from meshd.registry.consul import Blocking, ConsulClient, KVEntry
from meshd.registry.operator_key import OperatorKey
from tui.observe import (
    HostPoll,
    Instance,
    Observation,
    RegistryPoll,
    instances_from_health_connect,
    mesh_services,
)
from tui.prom import parse_metrics

POLL_TIMEOUT = 0.8  # seconds per read: a refresh stays within its one-second interval
# ``meshd tui``'s names of the admin TLS files, for the reasons shown when a host refuses
ADMIN_TLS_OPTIONS = ("--admin-ca", "--admin-cert", "--admin-key")


class MeshSource(Protocol):
    description: str
    routes: RouteConfigStore

    async def poll(self) -> Observation: ...

    async def aclose(self) -> None: ...


class MemoryKV:
    """A registry's KV in memory, with its check-and-set rule (fixed-data runs)."""

    base_url = "memory"

    def __init__(self, entries: Mapping[str, bytes], index: int = 1) -> None:
        self.index = index
        self.entries = {k: KVEntry(k, v, 0, index, index) for k, v in entries.items()}
        self.writes = 0

    async def kv_get(self, key: str) -> Blocking:
        return Blocking(self.entries.get(key), self.index)

    async def kv_put(self, key: str, value: bytes, *, cas: int | None = None) -> bool:
        existing = self.entries.get(key)
        if cas is not None and cas != (existing.modify_index if existing else 0):
            return False
        self.index += 1
        self.writes += 1
        created = existing.create_index if existing else self.index
        self.entries[key] = KVEntry(key, value, 0, created, self.index)
        return True


class MemoryRouteStore(RouteConfigStore):
    """The mesh config store over a KV in memory holding ``data`` at ``index`` (unsigned, as
    recorded): the same encoding, signing and check-and-set as against a registry."""

    def __init__(self, data: Mapping[str, Any], index: int = 1, *,
                 signer: OperatorKey | None = None) -> None:
        self.kv = MemoryKV({ROUTES_KEY: encode_routes(parse_routes(data, "fixed data"))}, index)
        super().__init__(self.kv, signer=signer)

    @property
    def writes(self) -> int:
        return self.kv.writes


@functools.cache
def on_this_machine(address: str) -> bool:
    """Whether the IP ``address`` is one of this machine's own (it can be bound here; a name
    is not looked up: hosts register IP addresses)."""
    try:
        ip = ipaddress.ip_address(address)
        with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET) as sock:
            sock.bind((str(ip), 0))
    except (OSError, ValueError):
        return False
    return True


def _loopback_only(admin: str) -> bool:
    host = admin.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class AdminTarget:
    """How the console reads one host's admin API."""

    address: str  # HOST:PORT to contact
    node: str
    tls: bool | None = None  # as published; None: published nothing (the console's own scheme)
    unreachable: str = ""  # why it is not contacted at all from here ("": it is)


def _reason(exc: BaseException) -> str:
    """Why a read of the registry failed."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class RegistrySource:
    def __init__(
        self, registry_url: str, admin_port: int = DEFAULT_ADMIN_PORT, *,
        token: str | None = None, timeout: float = POLL_TIMEOUT,
        admin_tls: ssl.SSLContext | None = None,
        admin_client_cert: bool = False, tls_options: tuple[str, str, str] = ADMIN_TLS_OPTIONS,
        clock: Callable[[], float] = time.time, signer: OperatorKey | None = None,
        here: Callable[[str], bool] = on_this_machine,
    ) -> None:
        """``admin_port``: for hosts that do not publish their admin address; ``admin_tls``:
        read admin APIs over HTTPS with this context (``[admin] tls = true``);
        ``admin_client_cert``: it holds an operator certificate (for the reason shown when a
        host refuses); ``token``: the registry ACL token (reads, and split edits); ``signer``:
        the operator certificate split edits are signed with; ``here``: whether an address is
        this machine's (an admin API on loopback is reachable only from its own host)."""
        self.description = f"registry {registry_url.rstrip('/')}"
        self.consul = ConsulClient(registry_url, token=token)
        self.routes = RouteConfigStore(self.consul, signer=signer)
        self.admin_port = admin_port
        self.timeout = timeout
        self.clock = clock
        self.admin = AdminClient(admin_tls, client_cert=admin_client_cert, timeout=timeout,
                                 options=tls_options, max_keepalive=64)
        # for hosts that publish a plain admin API while the console reads others over TLS
        self.plain = AdminClient(None, timeout=timeout) if admin_tls is not None else self.admin
        self.tls_options = tls_options
        self.here = here
        self._hosts: dict[str, AdminTarget] = {}  # by the host's key in the console, ever seen
        self._limit = asyncio.Semaphore(32)

    async def aclose(self) -> None:
        await self.admin.aclose()
        if self.plain is not self.admin:
            await self.plain.aclose()
        await self.consul.aclose()

    def admin_target(self, instance: Instance) -> tuple[str, AdminTarget]:
        """The host's key in the console (its admin HOST:PORT) and how to read it."""
        if not instance.admin:
            host = f"[{instance.address}]" if ":" in instance.address else instance.address
            address = f"{host}:{self.admin_port}"
            return address, AdminTarget(address, instance.node)
        admin, tls = instance.admin, instance.admin_tls
        if _loopback_only(admin) and not self.here(instance.address):
            # every such host may publish the same address: told apart by the host's own
            return f"{admin} on {instance.address}", AdminTarget(
                admin, instance.node, tls,
                f"admin on loopback only ({admin}): not reachable from here")
        if tls and self.admin.tls is None:
            return admin, AdminTarget(admin, instance.node, tls, (
                "admin API over TLS: an operator certificate is required "
                f"({', '.join(self.tls_options)})"))
        return admin, AdminTarget(admin, instance.node, tls)

    async def poll(self) -> Observation:
        at = self.clock()
        known = dict(self._hosts)
        registry, hosts = await asyncio.gather(
            self._poll_registry(at), self._poll_hosts(known, at))
        for inst in registry.instances:
            key, target = self.admin_target(inst)
            self._hosts[key] = target  # (a restarted host may publish anew)
        found = {k: t for k, t in self._hosts.items() if k not in known}
        if found:  # new hosts: read them now rather than a refresh later
            hosts += await self._poll_hosts(found, at)
        return Observation(at, registry, tuple(sorted(hosts, key=lambda h: h.admin)))

    async def _poll_registry(self, at: float) -> RegistryPoll:
        try:
            async with asyncio.timeout(self.timeout):
                services = mesh_services(await self.consul.catalog_services())
                answers = await asyncio.gather(
                    *(self.consul.health_connect(s) for s in services))
                routes, index = await self.routes.peek()
        except (MeshError, TimeoutError) as exc:
            return RegistryPoll(at, error=_reason(exc))
        instances = [i for s, a in zip(services, answers, strict=True)
                     for i in instances_from_health_connect(s, a.data)]
        return RegistryPoll(at, "", tuple(instances), routes, index)

    async def _poll_hosts(self, hosts: Mapping[str, AdminTarget], at: float) -> list[HostPoll]:
        return list(await asyncio.gather(*(self._poll_host(k, t, at)
                                           for k, t in sorted(hosts.items()))))

    async def _poll_host(self, key: str, target: AdminTarget, at: float) -> HostPoll:
        node = target.node
        if target.unreachable:
            return HostPoll(key, node, at, error=target.unreachable)
        client = self.plain if target.tls is False else self.admin
        base = client.base_url(target.address)
        try:
            async with self._limit, asyncio.timeout(self.timeout):
                state, text = await asyncio.gather(client.state(base), client.metrics(base))
            metrics = parse_metrics(text)
        except AdminError as exc:
            plain_refusal = exc.failure is Failure.CONNECT and client.tls is None
            return HostPoll(key, node, at,
                            error="connection refused" if plain_refusal else exc.reason)
        except (TimeoutError, ValueError) as exc:
            return HostPoll(key, node, at, error=_reason(exc))
        return HostPoll(key, str(state.get("node") or node), at, state, metrics)


class FixedSource:
    """Replays observations (the last one for ever): fixed data for tests and screenshots."""

    def __init__(self, observations: Sequence[Observation],
                 routes: RouteConfigStore | None = None, description: str = "fixed data") -> None:
        if not observations:
            raise ValueError("FixedSource needs at least one observation")
        self.observations = list(observations)
        self.description = description
        self.routes: RouteConfigStore = routes or MemoryRouteStore(
            observations[-1].registry.routes or {"destinations": {}},
            observations[-1].registry.routes_index or 1)
        self._next = 0

    async def poll(self) -> Observation:
        obs = self.observations[min(self._next, len(self.observations) - 1)]
        self._next += 1
        return obs

    async def aclose(self) -> None:
        return None
