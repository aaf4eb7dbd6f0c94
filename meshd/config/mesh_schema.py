"""The frozen tree a ``mesh.toml`` becomes (see ``meshd.config.mesh`` for the parser), and the
``address:port`` claims derived from it. Pure."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd.config.gateway import Gateway
from meshd.config.schema import LocalService

DEFAULT_REGISTRY = "127.0.0.1:8500"
DEFAULT_CA = "127.0.0.1:8443"
DEFAULT_INBOUND_PORT = 15001
DEFAULT_ADMIN_PORT = 15000
DEFAULT_OUTBOUND_ADDRESS = "127.0.0.1"


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class MeshService:
    """A service instance on a simulated host, and how to start its app.

    An empty ``command`` means ``meshd up`` does not start the app: something else runs it."""

    service: LocalService
    command: tuple[str, ...] = ()


@dataclass(frozen=True)
class MeshHost:
    name: str
    address: str
    inbound_port: int = DEFAULT_INBOUND_PORT
    admin_port: int = DEFAULT_ADMIN_PORT
    outbound_address: str = DEFAULT_OUTBOUND_ADDRESS
    services: tuple[MeshService, ...] = ()
    gateways: tuple[Gateway, ...] = ()
    # its meshd's worker processes: one on a laptop, where many meshds share the cores
    # (None: ``"auto"``, as meshd.toml's default)
    workers: int | None = 1

    @property
    def admin(self) -> HostPort:
        return HostPort(self.address, self.admin_port)

    @property
    def inbound(self) -> HostPort:
        return HostPort(self.address, self.inbound_port)


@dataclass(frozen=True)
class MeshExternal:
    """A stand-in for a service outside the mesh, started by ``meshd up`` on ``address:port``
    (``[[external]]``). With ``tls_name``, ``meshd up`` makes a CA and a certificate for that
    name (the command gets them as ``{cert}``, ``{key}``, ``{ca}``), and the route table's
    external destination of the same ``name`` verifies the server against that CA."""

    name: str
    address: str
    port: int
    command: tuple[str, ...]
    tls_name: str | None = None


@dataclass(frozen=True)
class MeshConfig:
    trust_domain: str
    hosts: tuple[MeshHost, ...]
    registry: HostPort = HostPort("127.0.0.1", 8500)
    ca: HostPort = HostPort("127.0.0.1", 8443)
    routes: Path | None = None
    run_dir: Path | None = None
    hints: tuple[str, ...] = ()
    source: str = "mesh.toml"
    externals: tuple[MeshExternal, ...] = ()


@dataclass(frozen=True)
class PortClaim:
    """An ``address:port`` some part of the mesh will listen on."""

    address: str
    port: int
    owner: str      # for people: "registry", "meshd host-a admin", "app web v1"
    key_path: str   # where mesh.toml declares it

    def __str__(self) -> str:
        return str(HostPort(self.address, self.port))


def host_data(host: MeshHost, trust_domain: str, registry: HostPort, ca: HostPort,
              fingerprint: str, *, token_file: str = "join-token",
              state_dir: str = "state") -> dict[str, Any]:
    """The host-level keys of a simulated host's ``meshd.toml`` (everything but services)."""
    return {
        "node": host.name,
        "address": host.address,
        "trust_domain": trust_domain,
        "registry": f"consul://{registry}",
        "state_dir": state_dir,
        "ca": {"url": f"https://{ca}", "fingerprint": fingerprint, "token_file": token_file},
        "inbound": {"port": host.inbound_port},
        "admin": {"address": str(host.admin)},
        "outbound": {"address": host.outbound_address},
        "workers": "auto" if host.workers is None else host.workers,
    }


def port_claims(mesh: MeshConfig) -> list[PortClaim]:
    """Every ``address:port`` the mesh listens on, with who wants it."""
    return port_claims_of(list(mesh.hosts), mesh.registry, mesh.ca, mesh.externals)


def port_claims_of(hosts: list[MeshHost], registry: HostPort | None,
                   ca: HostPort | None, externals: tuple[MeshExternal, ...] = ()
                   ) -> list[PortClaim]:
    claims: list[PortClaim] = []
    if registry is not None:
        claims.append(PortClaim(registry.host, registry.port, "registry", "registry"))
    if ca is not None:
        claims.append(PortClaim(ca.host, ca.port, "ca", "ca"))
    for i, host in enumerate(hosts):
        hp = f"hosts[{i}]"
        claims.append(PortClaim(host.address, host.inbound_port,
                                f"meshd {host.name} inbound", f"{hp}.inbound_port"))
        claims.append(PortClaim(host.address, host.admin_port,
                                f"meshd {host.name} admin", f"{hp}.admin_port"))
        for j, ms in enumerate(host.services):
            svc = ms.service
            claims.append(PortClaim(svc.address, svc.port, f"app {svc.name} {svc.version}",
                                    f"{hp}.services[{j}].port"))
            for k, up in enumerate(svc.upstreams):
                claims.append(PortClaim(
                    host.outbound_address, up.local_port,
                    f"meshd {host.name} upstream {up.name}",
                    f"{hp}.services[{j}].upstreams[{k}].local_port"))
        for j, gateway in enumerate(host.gateways):
            for k, listener in enumerate(gateway.listeners):
                claims.append(PortClaim(
                    listener.address, listener.port,
                    f"meshd {host.name} gateway {gateway.name} ({listener.protocol})",
                    f"{hp}.gateways[{j}].listeners[{k}].port"))
    claims += [PortClaim(ext.address, ext.port, f"external {ext.name}", f"external[{i}].port")
               for i, ext in enumerate(externals)]
    return claims


def clashes(claims: list[PortClaim]) -> list[tuple[PortClaim, PortClaim]]:
    """Each claim that overlaps an earlier one, paired with that earlier claim. A wildcard
    address (0.0.0.0, ::) overlaps every address of the same port."""
    out: list[tuple[PortClaim, PortClaim]] = []
    for n, claim in enumerate(claims):
        for other in claims[:n]:
            if claim.port == other.port and _overlap(claim.address, other.address):
                out.append((claim, other))
                break
    return out


def _overlap(a: str, b: str) -> bool:
    return a == b or ipaddress.ip_address(a).is_unspecified \
        or ipaddress.ip_address(b).is_unspecified
