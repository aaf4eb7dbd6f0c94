"""``[[gateways]]`` in meshd.toml: ingress gateways, the mesh's front doors. Pure.

A gateway listens on outside addresses (``[[gateways.listeners]]``: plain HTTP, HTTPS
terminated with the operator's certificates, picked by SNI, or TLS passed through by SNI to a
TCP service) and routes each request by host and path (``[[gateways.routes]]``) to a mesh
service, which it calls like any local app would: the route table, policies and mTLS of the
mesh, with the gateway's own identity (``spiffe://<trust domain>/svc/<name>``), so a
destination's authorization rules can name it as a source.

    [[gateways]]
    name = "edge"
    [[gateways.listeners]]
    port = 8000                       # address defaults to 0.0.0.0
    protocol = "http"
    redirect_https = 8443             # optional: every request answered 308 to https
    [[gateways.listeners]]
    port = 8443
    protocol = "https"
    certificates = [{ cert = "edge.crt", key = "edge.key", hosts = ["shop.example.com"] }]
    [[gateways.routes]]
    hosts = ["shop.example.com", "*.shop.example.com"]   # default ["*"]
    path_prefix = "/"                                     # default "/"
    service = "web"
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd.config.reader import Reader

PROTOCOLS = ("http", "https", "tls")
_HOST = re.compile(r"^(\*|(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}"
                   r"[a-z0-9])?)*)$")


@dataclass(frozen=True)
class GatewayCertificate:
    cert: Path
    key: Path
    hosts: tuple[str, ...] = ()  # the SNI names it serves ("*.example.com" allowed)


@dataclass(frozen=True)
class GatewayListener:
    port: int
    protocol: str = "http"  # http, https (TLS terminated here), tls (passed through by SNI)
    address: str = "0.0.0.0"
    certificates: tuple[GatewayCertificate, ...] = ()  # https: the first is the default
    redirect_https: int | None = None  # http: answer every request 308 to https on this port


@dataclass(frozen=True)
class GatewayRoute:
    service: str
    hosts: tuple[str, ...] = ("*",)
    path_prefix: str = "/"


@dataclass(frozen=True)
class Gateway:
    name: str
    listeners: tuple[GatewayListener, ...]
    routes: tuple[GatewayRoute, ...]


GATEWAY_KEYS = {"name", "listeners", "routes"}
LISTENER_KEYS = {"port", "protocol", "address", "certificates", "redirect_https"}
ROUTE_KEYS = {"service", "hosts", "path_prefix"}


# where ``meshd up`` puts the certificate it makes for an https listener of a mesh.toml that
# says ``certificates = "generate"`` (replaced by the real files before meshd.toml is written)
GENERATED = Path("{generated}")


def parse_gateways(r: Reader, data: Mapping[str, Any], base: Path, *,
                   generated: bool = False) -> tuple[Gateway, ...]:
    """``generated``: certificate files under ``GENERATED`` are taken on trust (``meshd up``
    makes them before any meshd reads them)."""
    gateways: list[Gateway] = []
    for i, raw in enumerate(r.get(data, "gateways", "", list, []) or []):
        path = f"gateways[{i}]"
        if not isinstance(raw, dict):
            r.problem(path, "expected a table ([[gateways]])")
            continue
        gateway = _gateway(r, raw, path, base, generated)
        if gateway is not None:
            gateways.append(gateway)
    seen: dict[str, str] = {}
    for i, gateway in enumerate(gateways):
        if gateway.name in seen:
            r.problem(f"gateways[{i}].name",
                      f"duplicate gateway {gateway.name!r} (also {seen[gateway.name]})")
        seen.setdefault(gateway.name, f"gateways[{i}]")
    return tuple(gateways)


def _gateway(r: Reader, raw: Mapping[str, Any], path: str, base: Path,
             generated: bool) -> Gateway | None:
    before = len(r.problems)
    r.unknown_keys(raw, path, GATEWAY_KEYS)
    name = r.name(raw, "name", path)
    listeners: list[GatewayListener] = []
    for j, item in enumerate(r.get(raw, "listeners", path, list, []) or []):
        if not isinstance(item, dict):
            r.problem(f"{path}.listeners[{j}]", "expected a table ([[gateways.listeners]])")
        elif (listener := _listener(r, item, f"{path}.listeners[{j}]", base,
                                    generated)) is not None:
            listeners.append(listener)
    if not r.get(raw, "listeners", path, list, []):
        r.problem(f"{path}.listeners", "a gateway needs at least one listener")
    routes: list[GatewayRoute] = []
    for j, item in enumerate(r.get(raw, "routes", path, list, []) or []):
        if not isinstance(item, dict):
            r.problem(f"{path}.routes[{j}]", "expected a table ([[gateways.routes]])")
        elif (route := _route(r, item, f"{path}.routes[{j}]")) is not None:
            routes.append(route)
    if len(r.problems) != before:
        return None
    kept, route_list = tuple(listeners), tuple(routes)
    _check_routes(r, path, kept, route_list)
    if len(r.problems) != before:
        return None
    return Gateway(name, kept, route_list)


def _listener(r: Reader, raw: Mapping[str, Any], path: str, base: Path,
              generated: bool) -> GatewayListener | None:
    r.unknown_keys(raw, path, LISTENER_KEYS)
    port = r.port(raw, "port", path)
    protocol = r.get(raw, "protocol", path, str, "http")
    if protocol not in PROTOCOLS:
        r.problem(f"{path}.protocol", f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        return None
    address = r.ip(raw, "address", path, "0.0.0.0")
    redirect = r.get(raw, "redirect_https", path, int, None)
    if redirect is not None:
        if protocol != "http":
            r.problem(f"{path}.redirect_https", "only a plain http listener redirects to https")
        elif not 1 <= redirect <= 65535:
            r.problem(f"{path}.redirect_https", f"expected a port in 1-65535, got {redirect}")
    certificates: list[GatewayCertificate] = []
    for k, cert in enumerate(r.get(raw, "certificates", path, list, []) or []):
        cpath = f"{path}.certificates[{k}]"
        if not isinstance(cert, dict):
            r.problem(cpath, "expected a table { cert = ..., key = ..., hosts = [...] }")
            continue
        certificates.append(_certificate(r, cert, cpath, base, generated))
    if protocol == "https" and not certificates and "certificates" not in raw:
        r.problem(f"{path}.certificates",
                  "an https listener needs the certificate and key it terminates TLS with")
    if protocol != "https" and certificates:
        r.problem(f"{path}.certificates", f"a {protocol} listener terminates no TLS")
    if port is None or address is None:
        return None
    return GatewayListener(port, protocol, address, tuple(certificates), redirect)


def _certificate(r: Reader, raw: Mapping[str, Any], path: str, base: Path,
                 generated: bool) -> GatewayCertificate:
    r.unknown_keys(raw, path, {"cert", "key", "hosts"})
    files = []
    for key in ("cert", "key"):
        value = r.get(raw, key, path, str)
        file = base / value if isinstance(value, str) else Path()
        if isinstance(value, str) and not file.is_file() and not (
                generated and file.is_relative_to(base / GENERATED)):
            r.problem(f"{path}.{key}", f"no such file: {file}")
        files.append(file)
    return GatewayCertificate(files[0], files[1], _hosts(r, raw, path, default=()))


def _hosts(r: Reader, raw: Mapping[str, Any], path: str,
           default: tuple[str, ...]) -> tuple[str, ...]:
    if "hosts" not in raw:
        return default
    hosts = []
    for k, host in enumerate(r.get(raw, "hosts", path, list, []) or []):
        if isinstance(host, str) and _HOST.fullmatch(host.lower()):
            hosts.append(host.lower())
        else:
            r.problem(f"{path}.hosts[{k}]",
                      f"expected a host name, \"*.suffix\" or \"*\", got {host!r}")
    if not hosts:
        r.problem(f"{path}.hosts", "expected at least one host name")
    return tuple(hosts)


def _route(r: Reader, raw: Mapping[str, Any], path: str) -> GatewayRoute | None:
    r.unknown_keys(raw, path, ROUTE_KEYS)
    service = r.name(raw, "service", path)
    prefix = r.get(raw, "path_prefix", path, str, "/")
    if isinstance(prefix, str) and not prefix.startswith("/"):
        r.problem(f"{path}.path_prefix", f"expected a path starting with '/', got {prefix!r}")
    hosts = _hosts(r, raw, path, default=("*",))
    if service is None or not isinstance(prefix, str):
        return None
    return GatewayRoute(service, hosts, prefix)


def _check_routes(r: Reader, path: str, listeners: tuple[GatewayListener, ...],
                  routes: tuple[GatewayRoute, ...]) -> None:
    if not routes and any(x.redirect_https is None for x in listeners):
        r.problem(f"{path}.routes", "a gateway needs at least one route")
    if any(x.protocol == "tls" for x in listeners):
        for j, route in enumerate(routes):
            if route.path_prefix != "/" and all(x.protocol == "tls" for x in listeners):
                r.problem(f"{path}.routes[{j}].path_prefix",
                          "a tls (passthrough) listener routes by SNI only")


# -- matching (pure, used by the gateway's listeners and by explain) -------------------------------


def host_matches(pattern: str, host: str) -> bool:
    """``*`` matches any host, ``*.example.com`` any name under it (not itself)."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def route_for(routes: tuple[GatewayRoute, ...], host: str, path: str) -> GatewayRoute | None:
    """The first route whose hosts match ``host`` (lower case, no port) and whose prefix
    ``path`` starts with."""
    for route in routes:
        if any(host_matches(p, host) for p in route.hosts) and path.startswith(
                route.path_prefix):
            return route
    return None


def request_host(authority: str) -> str:
    """The host of a ``Host`` header or ``:authority`` (lower case, without its port)."""
    host = authority.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
