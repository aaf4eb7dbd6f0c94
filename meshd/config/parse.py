"""Pure parsing and validation: mappings in, frozen config out, or a ``ConfigError`` listing every
problem with its file, key path and reason. No file I/O here (see ``meshd.config.load``)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from meshd.config.durations import parse_duration
from meshd.config.schema import (
    CASettings,
    DestinationRoutes,
    HealthCheck,
    HostConfig,
    LocalService,
    Protocol,
    RouteTable,
    SplitLeg,
    Subset,
    Upstream,
)
from meshd.errors import ConfigError, Problem

T = TypeVar("T")

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$")
FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_MISSING = object()


class _Reader:
    """Walks a mapping, collecting problems instead of stopping at the first."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def problem(self, path: str, reason: str) -> None:
        self.problems.append(Problem(self.file, path, reason))

    def unknown_keys(self, data: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for key in data:
            if key not in allowed:
                where = f"{path}.{key}" if path else key
                self.problem(where, f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def get(
        self, data: Mapping[str, Any], key: str, path: str, kind: type | tuple[type, ...],
        default: Any = _MISSING,
    ) -> Any:
        where = f"{path}.{key}" if path else key
        if key not in data:
            if default is _MISSING:
                self.problem(where, "required key is missing")
                return None
            return default
        value = data[key]
        # bool is an int subclass: never accept it where a number is expected
        if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
            self.problem(where, f"expected {_kind_name(kind)}, got a boolean")
            return None
        if not isinstance(value, kind):
            self.problem(where, f"expected {_kind_name(kind)}, got {type(value).__name__}")
            return None
        return value

    def name(self, data: Mapping[str, Any], key: str, path: str, default: Any = _MISSING) -> Any:
        value = self.get(data, key, path, str, default)
        if isinstance(value, str) and value is not default and not NAME_RE.match(value):
            self.problem(
                f"{path}.{key}" if path else key,
                f"invalid name {value!r}: use lowercase letters, digits and '-' (max 63)",
            )
            return None
        return value

    def port(self, data: Mapping[str, Any], key: str, path: str, default: Any = _MISSING) -> Any:
        value = self.get(data, key, path, int, default)
        if isinstance(value, int) and not 1 <= value <= 65535:
            self.problem(f"{path}.{key}" if path else key,
                         f"port {value} out of range (1-65535)")
            return None
        return value

    def duration(
        self, data: Mapping[str, Any], key: str, path: str, default: Any = _MISSING
    ) -> Any:
        value = self.get(data, key, path, (str, int, float), default)
        if value is None or value is default:
            return value
        where = f"{path}.{key}" if path else key
        if isinstance(value, str):
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                self.problem(where, str(exc))
                return None
        else:
            seconds = float(value)
        if seconds <= 0:
            self.problem(where, "duration must be greater than zero")
            return None
        return seconds

    def choice(
        self, data: Mapping[str, Any], key: str, path: str, enum: Callable[[str], T],
        allowed: list[str], default: Any = _MISSING,
    ) -> Any:
        value = self.get(data, key, path, str, default)
        if value is None or value is default:
            return value
        if value not in allowed:
            self.problem(f"{path}.{key}" if path else key,
                         f"must be one of {', '.join(allowed)}, got {value!r}")
            return None
        return enum(value)

    def ip(self, data: Mapping[str, Any], key: str, path: str, default: Any = _MISSING) -> Any:
        value = self.get(data, key, path, str, default)
        if isinstance(value, str):
            try:
                ipaddress.ip_address(value)
            except ValueError:
                self.problem(f"{path}.{key}" if path else key,
                             f"{value!r} is not an IP address")
                return None
        return value

    def fail_if_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             dict: "a table", list: "an array"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


# --------------------------------------------------------------------------------------------
# meshd.toml

HOST_KEYS = {"node", "address", "trust_domain", "registry", "ca", "inbound", "admin",
             "outbound", "state_dir", "services"}


def parse_host_config(data: Mapping[str, Any], file: str = "meshd.toml",
                      base_dir: Path | None = None) -> HostConfig:
    """Build a ``HostConfig`` from a parsed ``meshd.toml``. Relative paths in it are resolved
    against ``base_dir`` (the file's directory)."""
    r = _Reader(file)
    base = base_dir or Path(".")
    r.unknown_keys(data, "", HOST_KEYS)
    node = r.name(data, "node", "")
    address = r.ip(data, "address", "", "127.0.0.1")
    trust_domain = r.get(data, "trust_domain", "", str)
    if isinstance(trust_domain, str) and not TRUST_DOMAIN_RE.match(trust_domain):
        r.problem("trust_domain", f"invalid trust domain {trust_domain!r}")
    registry_url = _registry_url(r, r.get(data, "registry", "", str, "consul://127.0.0.1:8500"))

    ca = _parse_ca(r, r.get(data, "ca", "", dict, None), base)

    inbound = r.get(data, "inbound", "", dict, {}) or {}
    r.unknown_keys(inbound, "inbound", {"port"})
    inbound_port = r.port(inbound, "port", "inbound", 15001)

    admin = r.get(data, "admin", "", dict, {}) or {}
    r.unknown_keys(admin, "admin", {"address"})
    admin_host, admin_port = _hostport(r, admin.get("address", "127.0.0.1:15000"),
                                       "admin.address")
    if admin_host and not _is_loopback(admin_host):
        r.problem("admin.address",
                  f"{admin_host} is not a loopback address: the admin API (state, metrics) is "
                  "unauthenticated and stays on loopback (127.0.0.0/8 or ::1)")

    outbound = r.get(data, "outbound", "", dict, {}) or {}
    r.unknown_keys(outbound, "outbound", {"address"})
    outbound_address = r.ip(outbound, "address", "outbound", "127.0.0.1")

    state_dir_raw = r.get(data, "state_dir", "", str, "/var/lib/meshd")
    state_dir = (base / state_dir_raw) if isinstance(state_dir_raw, str) else Path(".")

    services_raw = r.get(data, "services", "", list, [])
    services: list[LocalService] = []
    for i, raw in enumerate(services_raw or []):
        path = f"services[{i}]"
        if not isinstance(raw, dict):
            r.problem(path, "expected a table ([[services]])")
            continue
        svc = _parse_local_service(r, raw, path)
        if svc is not None:
            services.append(svc)
    listeners = [(address or "", inbound_port, "inbound.port")] if inbound_port else []
    if admin_port:
        listeners.append((admin_host, admin_port, "admin.address"))
    _check_local_uniqueness(r, services, listeners)

    r.fail_if_problems()
    assert ca is not None
    return HostConfig(
        node=node, address=address, trust_domain=trust_domain, registry_url=registry_url,
        ca=ca, inbound_port=inbound_port, admin_host=admin_host, admin_port=admin_port,
        outbound_address=outbound_address, state_dir=state_dir, services=tuple(services),
        source=file,
    )


def _registry_url(r: _Reader, raw: str | None) -> str:
    if raw is None:
        return ""
    parts = urlsplit(raw)
    if parts.scheme not in ("consul", "http", "https") or not parts.hostname:
        r.problem("registry", f"expected consul://HOST:PORT or http(s)://HOST:PORT, got {raw!r}")
        return ""
    scheme = "http" if parts.scheme == "consul" else parts.scheme
    try:
        port = parts.port or 8500
    except ValueError:
        r.problem("registry", f"invalid port in {raw!r}")
        return ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{host}:{port}"


def _parse_ca(r: _Reader, raw: Mapping[str, Any] | None, base: Path) -> CASettings | None:
    if raw is None:
        r.problem("ca", "required table is missing (url, fingerprint, token_file)")
        return None
    r.unknown_keys(raw, "ca", {"url", "fingerprint", "token_file"})
    url = r.get(raw, "url", "ca", str)
    if isinstance(url, str) and urlsplit(url).scheme != "https":
        r.problem("ca.url", f"the CA is only reached over https, got {url!r}")
    fingerprint = r.get(raw, "fingerprint", "ca", str)
    if isinstance(fingerprint, str) and not FINGERPRINT_RE.match(fingerprint):
        r.problem("ca.fingerprint",
                  "expected sha256:<64 hex digits> as printed by `meshd ca init`")
    token_file = r.get(raw, "token_file", "ca", str)
    return CASettings(url=url or "", fingerprint=fingerprint or "",
                      token_file=base / (token_file or ""))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostport(r: _Reader, raw: Any, path: str) -> tuple[str, int]:
    if not isinstance(raw, str):
        r.problem(path, "expected \"HOST:PORT\"")
        return "127.0.0.1", 0
    host, sep, port = raw.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        r.problem(path, f"expected HOST:PORT with a port in 1-65535, got {raw!r}")
        return "127.0.0.1", 0
    try:
        ipaddress.ip_address(host)
    except ValueError:
        r.problem(path, f"{host!r} is not an IP address")
    return host, int(port)


SERVICE_KEYS = {"name", "port", "protocol", "version", "address", "health", "upstreams"}


def _parse_local_service(r: _Reader, raw: Mapping[str, Any], path: str) -> LocalService | None:
    before = len(r.problems)
    r.unknown_keys(raw, path, SERVICE_KEYS)
    name = r.name(raw, "name", path)
    port = r.port(raw, "port", path)
    protocol = r.choice(raw, "protocol", path, Protocol, ["http", "tcp"], Protocol.HTTP)
    version = r.name(raw, "version", path, "v1")
    address = r.ip(raw, "address", path, "127.0.0.1")
    health = _parse_health(r, r.get(raw, "health", path, dict, {}) or {}, f"{path}.health")
    upstreams: list[Upstream] = []
    for j, up in enumerate(r.get(raw, "upstreams", path, list, []) or []):
        upath = f"{path}.upstreams[{j}]"
        if not isinstance(up, dict):
            r.problem(upath, "expected a table ([[services.upstreams]])")
            continue
        r.unknown_keys(up, upath, {"name", "local_port", "protocol"})
        uname = r.name(up, "name", upath)
        uport = r.port(up, "local_port", upath)
        uproto = r.choice(up, "protocol", upath, Protocol, ["http", "tcp"], Protocol.HTTP)
        if uname is not None and uport is not None and uproto is not None:
            upstreams.append(Upstream(uname, uport, uproto))
    if len(r.problems) != before:
        return None
    return LocalService(name=name, port=port, protocol=protocol, version=version,
                        address=address, health=health,
                        upstreams=tuple(upstreams))


def _parse_health(r: _Reader, raw: Mapping[str, Any], path: str) -> HealthCheck:
    r.unknown_keys(raw, path, {"http", "tcp", "none", "interval", "timeout"})
    interval = r.duration(raw, "interval", path, 5.0)
    timeout = r.duration(raw, "timeout", path, 2.0)
    kinds = [k for k in ("http", "tcp", "none") if k in raw]
    if len(kinds) > 1:
        r.problem(path, f"choose one check kind, got {' and '.join(kinds)}")
        return HealthCheck()
    if "http" in raw:
        hpath = r.get(raw, "http", path, str)
        if isinstance(hpath, str) and not hpath.startswith("/"):
            r.problem(f"{path}.http", f"expected a path starting with '/', got {hpath!r}")
        return HealthCheck("http", hpath or "/", interval or 5.0, timeout or 2.0)
    if "none" in raw:
        r.get(raw, "none", path, bool)
        return HealthCheck("none", "/", interval or 5.0, timeout or 2.0)
    if "tcp" in raw:
        r.get(raw, "tcp", path, bool)
    return HealthCheck("tcp", "/", interval or 5.0, timeout or 2.0)


def _check_local_uniqueness(
    r: _Reader, services: list[LocalService], listeners: list[tuple[str, int, str]]
) -> None:
    """No two services share a name, and no two sockets on this host (meshd's own listeners,
    given as (address, port, key path), and the apps') share an address and port."""
    seen_names: dict[str, int] = {}
    for i, svc in enumerate(services):
        if svc.name in seen_names:
            r.problem(f"services[{i}].name",
                      f"duplicate service {svc.name!r} (also services[{seen_names[svc.name]}])")
        seen_names.setdefault(svc.name, i)
        for j, up in enumerate(svc.upstreams):
            if up.name == svc.name:
                r.problem(f"services[{i}].upstreams[{j}].name",
                          "a service cannot declare itself as an upstream")
    claims = list(listeners)
    for i, svc in enumerate(services):
        claims.append((svc.address, svc.port, f"services[{i}].port"))
    for i, svc in enumerate(services):
        for j, up in enumerate(svc.upstreams):
            claims.append(("", up.local_port, f"services[{i}].upstreams[{j}].local_port"))
    taken: list[tuple[str, int, str]] = []
    for address, port, where in claims:
        clash = next((w for a, p, w in taken if p == port and _overlap(a, address)), None)
        if clash is not None:
            r.problem(where, f"duplicate local port {port} (also {clash})")
        taken.append((address, port, where))


def _overlap(a: str, b: str) -> bool:
    """Whether two bind addresses collide ("" = the outbound address, compared by port only:
    upstream listeners and apps on the same port of any loopback address confuse operators)."""
    wildcard = ("", "0.0.0.0", "::")
    return a == b or a in wildcard or b in wildcard


# --------------------------------------------------------------------------------------------
# routes.toml

DESTINATION_KEYS = {"subsets", "split", "timeout"}


def parse_routes(data: Mapping[str, Any], file: str = "routes.toml") -> RouteTable:
    """Build a ``RouteTable`` from a parsed ``routes.toml`` (or its canonical JSON form)."""
    r = _Reader(file)
    r.unknown_keys(data, "", {"destinations"})
    dests_raw = r.get(data, "destinations", "", dict, {}) or {}
    dests: list[DestinationRoutes] = []
    for service, raw in dests_raw.items():
        path = f"destinations.{service}"
        if not NAME_RE.match(service):
            r.problem(path, f"invalid service name {service!r}")
            continue
        if not isinstance(raw, dict):
            r.problem(path, "expected a table")
            continue
        dest = _parse_destination(r, service, raw, path)
        if dest is not None:
            dests.append(dest)
    r.fail_if_problems()
    return RouteTable(tuple(sorted(dests, key=lambda d: d.service)))


def _parse_destination(
    r: _Reader, service: str, raw: Mapping[str, Any], path: str
) -> DestinationRoutes | None:
    before = len(r.problems)
    r.unknown_keys(raw, path, DESTINATION_KEYS)
    subsets: list[Subset] = []
    for name, sub in (r.get(raw, "subsets", path, dict, {}) or {}).items():
        spath = f"{path}.subsets.{name}"
        if not NAME_RE.match(name):
            r.problem(spath, f"invalid subset name {name!r}")
            continue
        if not isinstance(sub, dict):
            r.problem(spath, "expected a table like { version = \"v1\" }")
            continue
        r.unknown_keys(sub, spath, {"version"})
        version = r.name(sub, "version", spath)
        if version is not None:
            subsets.append(Subset(name, version))
    split: list[SplitLeg] = []
    split_raw = r.get(raw, "split", path, dict, {}) or {}
    known = {s.name for s in subsets}
    for name, weight in split_raw.items():
        lpath = f"{path}.split.{name}"
        if isinstance(weight, bool) or not isinstance(weight, int):
            r.problem(lpath, f"weight must be an integer, got {weight!r}")
            continue
        if not 0 <= weight <= 100:
            r.problem(lpath, f"weight {weight} out of range (0-100)")
            continue
        if name not in known:
            hint = f" (declared: {', '.join(sorted(known))})" if known else \
                " (declare it under subsets)"
            r.problem(lpath, f"unknown subset {name!r}{hint}")
            continue
        split.append(SplitLeg(name, weight))
    if split and len(split) == len(split_raw):
        total = sum(leg.weight for leg in split)
        if total != 100:
            r.problem(f"{path}.split", f"weights sum to {total}, must sum to 100")
    timeout = r.duration(raw, "timeout", path, None)
    if len(r.problems) != before:
        return None
    return DestinationRoutes(service, tuple(subsets), tuple(split), timeout)


def routes_to_data(table: RouteTable) -> dict[str, Any]:
    """The canonical mapping form of a route table (what is stored in the registry's KV as
    JSON); ``parse_routes(routes_to_data(t)) == t``."""
    out: dict[str, Any] = {}
    for d in table.destinations:
        entry: dict[str, Any] = {}
        if d.subsets:
            entry["subsets"] = {s.name: {"version": s.version} for s in d.subsets}
        if d.split:
            entry["split"] = {leg.subset: leg.weight for leg in d.split}
        if d.timeout is not None:
            entry["timeout"] = d.timeout
        out[d.service] = entry
    return {"destinations": out}
