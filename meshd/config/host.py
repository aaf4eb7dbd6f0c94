"""``meshd.toml``, one host's configuration: a parsed mapping in, a frozen ``HostConfig`` out, or
a ``ConfigError`` listing every problem with its file, key path and reason. Pure (file I/O is in
``meshd.config.load``)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meshd.config.gateway import parse_gateways
from meshd.config.reader import Reader
from meshd.config.schema import (
    DEFAULT_ADMIN_LIMITS,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_INBOUND_LIMITS,
    DEFAULT_OUTBOUND_LIMITS,
    TRACE_SAMPLERS,
    AccessLogFormat,
    CASettings,
    HealthCheck,
    HostConfig,
    ListenerLimits,
    LocalService,
    MTLSMode,
    Protocol,
    TracingConfig,
    Upstream,
)
from meshd.names import NAME_RULE, is_valid_name

FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")

HOST_KEYS = {"node", "address", "trust_domain", "registry", "registry_token",
             "registry_token_file", "ca", "inbound", "admin", "outbound", "state_dir",
             "services", "drain_timeout", "labels", "access_log", "gateways",
             "tracing", "workers"}


def parse_host_config(data: Mapping[str, Any], file: str = "meshd.toml",
                      base_dir: Path | None = None, *, generated: bool = False) -> HostConfig:
    """Build a ``HostConfig`` from a parsed ``meshd.toml``. Relative paths in it are resolved
    against ``base_dir`` (the file's directory). ``generated``: gateway certificates that
    ``meshd up`` will make are not looked for (``config.gateway.GENERATED``)."""
    r = Reader(file)
    base = base_dir or Path(".")
    r.unknown_keys(data, "", HOST_KEYS)
    node = r.name(data, "node", "")
    address = r.ip(data, "address", "", "127.0.0.1")
    trust_domain = r.trust_domain(data, "trust_domain", "")
    registry_url = _registry_url(r, r.get(data, "registry", "", str, "consul://127.0.0.1:8500"))
    registry_token = r.get(data, "registry_token", "", str, "") or ""
    registry_token_file = _registry_token_file(r, data, base)

    ca = _parse_ca(r, r.get(data, "ca", "", dict, None), base)

    inbound = r.get(data, "inbound", "", dict, {}) or {}
    r.unknown_keys(inbound, "inbound", {"port", "handshake_timeout", *LIMIT_KEYS})
    inbound_port = r.port(inbound, "port", "inbound", 15001)
    inbound_limits = _limits(r, inbound, "inbound", DEFAULT_INBOUND_LIMITS)
    handshake_timeout = r.duration(inbound, "handshake_timeout", "inbound",
                                   DEFAULT_HANDSHAKE_TIMEOUT)

    admin = r.get(data, "admin", "", dict, {}) or {}
    r.unknown_keys(admin, "admin", {"address", "tls", "allowed_hosts", *LIMIT_KEYS})
    admin_limits = _limits(r, admin, "admin", DEFAULT_ADMIN_LIMITS)
    admin_address = r.hostport(admin.get("address", "127.0.0.1:15000"), "admin.address")
    admin_host, admin_port = admin_address or ("127.0.0.1", 0)
    admin_tls = r.get(admin, "tls", "admin", bool, False) is True
    allowed_hosts: list[str] = []
    for k, name in enumerate(r.get(admin, "allowed_hosts", "admin", list, []) or []):
        if isinstance(name, str) and _HOST_NAME.fullmatch(name):
            allowed_hosts.append(name.lower())
        else:
            r.problem(f"admin.allowed_hosts[{k}]",
                      f"expected a DNS name clients use to reach the admin API, got {name!r}")
    if admin_host and not admin_tls and not _is_loopback(admin_host):
        r.problem("admin.address",
                  f"{admin_host} is not a loopback address: without TLS the admin API (state, "
                  "metrics) is unauthenticated and stays on loopback (127.0.0.0/8 or ::1); "
                  "set admin.tls = true to serve it beyond, to holders of an operator "
                  "certificate (`meshd ca issue --operator NAME`)")

    outbound = r.get(data, "outbound", "", dict, {}) or {}
    # no cap per source on outbound listeners: every client is a local app on loopback, and
    # each listener serves one app's upstream, so its own cap is the cap per app
    r.unknown_keys(outbound, "outbound", {"address", "beyond_loopback", "max_connections",
                                          "egress_port"})
    outbound_limits = _limits(r, outbound, "outbound", DEFAULT_OUTBOUND_LIMITS)
    outbound_address = r.ip(outbound, "address", "outbound", "127.0.0.1")
    beyond_loopback = (r.get(outbound, "beyond_loopback", "outbound", str, "") or "").strip()
    if outbound_address and not _is_loopback(outbound_address) and not beyond_loopback:
        r.problem("outbound.address",
                  f"{outbound_address} is not a loopback address: an outbound listener is "
                  "plaintext and calls the mesh with this host's service identities, so beyond "
                  "loopback anyone who reaches it speaks as those services; keep it on "
                  "loopback, or say why it is safe in outbound.beyond_loopback = \"...\" "
                  "(e.g. a firewall admits only the local containers)")

    drain_timeout = r.duration(data, "drain_timeout", "", DEFAULT_DRAIN_TIMEOUT)
    access_log = r.get(data, "access_log", "", dict, {}) or {}
    r.unknown_keys(access_log, "access_log", {"format"})
    access_format = r.choice(access_log, "format", "access_log", AccessLogFormat,
                             [f.value for f in AccessLogFormat], AccessLogFormat.TEXT)
    workers = parse_workers(r, data.get("workers", "auto"), "workers")
    labels = _labels(r, data)
    tracing = _parse_tracing(r, r.get(data, "tracing", "", dict, {}) or {})
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
    gateways = parse_gateways(r, data, base, generated=generated)
    listeners = [(address or "", inbound_port, "inbound.port")] if inbound_port else []
    if admin_port:
        listeners.append((admin_host, admin_port, "admin.address"))
    listeners += [(x.address, x.port, f"gateways[{i}].listeners[{j}].port")
                  for i, g in enumerate(gateways) for j, x in enumerate(g.listeners)]
    for i, gateway in enumerate(gateways):
        if any(s.name == gateway.name for s in services):
            r.problem(f"gateways[{i}].name", f"{gateway.name!r} is also a local service: a "
                      "gateway has an identity of its own")
    # the egress proxy listener (HTTP_PROXY/HTTPS_PROXY for local apps), on the outbound address
    egress_port = r.port(outbound, "egress_port", "outbound", None)
    if egress_port:
        listeners.append(("", egress_port, "outbound.egress_port"))
    _check_local_uniqueness(r, services, listeners)
    _check_permissive(r, services)

    r.fail_if_problems()
    assert ca is not None
    return HostConfig(
        node=node, address=address, trust_domain=trust_domain, registry_url=registry_url,
        ca=ca, inbound_port=inbound_port, admin_host=admin_host, admin_port=admin_port,
        admin_tls=admin_tls, admin_allowed_hosts=tuple(allowed_hosts),
        outbound_address=outbound_address, outbound_beyond_loopback=beyond_loopback,
        state_dir=state_dir, services=tuple(services),
        source=file, registry_token=registry_token, registry_token_file=registry_token_file,
        drain_timeout=drain_timeout or DEFAULT_DRAIN_TIMEOUT,
        inbound_limits=inbound_limits, outbound_limits=outbound_limits,
        admin_limits=admin_limits, inbound_handshake_timeout=handshake_timeout,
        labels=labels, access_log=access_format or AccessLogFormat.TEXT, gateways=gateways,
        tracing=tracing, egress_port=egress_port, workers=workers,
    )


MAX_WORKERS = 64


def parse_workers(r: Reader, raw: object, key: str) -> int | None:
    """``workers``: a count of data-plane processes, 1 to ``MAX_WORKERS``, or ``"auto"``
    (None: decided on the host from its usable cores)."""
    if raw == "auto":
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_WORKERS:
        r.problem(key, f"expected \"auto\" or a number of worker processes from 1 to "
                  f"{MAX_WORKERS}, got {raw!r}")
        return None
    return raw


LIMIT_KEYS = ("max_connections", "max_connections_per_source")


def _parse_tracing(r: Reader, raw: Mapping[str, Any]) -> TracingConfig:
    r.unknown_keys(raw, "tracing", {"enabled", "endpoint", "sampler", "ratio", "service_name"})
    enabled = r.get(raw, "enabled", "tracing", bool, None)
    endpoint = r.get(raw, "endpoint", "tracing", str, "") or ""
    if endpoint and not _is_http_url(endpoint):
        r.problem("tracing.endpoint", f"expected an http:// or https:// URL (the OTLP/HTTP "
                  f"traces endpoint, e.g. http://127.0.0.1:4318/v1/traces), got {endpoint!r}")
    sampler = r.get(raw, "sampler", "tracing", str, "") or ""
    if sampler and sampler not in TRACE_SAMPLERS:
        r.problem("tracing.sampler", f"must be one of {', '.join(TRACE_SAMPLERS)}, "
                  f"got {sampler!r}")
    ratio = r.get(raw, "ratio", "tracing", (int, float), None)
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        r.problem("tracing.ratio", f"a sampling ratio is between 0 and 1, got {ratio}")
    service_name = r.get(raw, "service_name", "tracing", str, "") or ""
    return TracingConfig(enabled=enabled, endpoint=endpoint, sampler=sampler,
                         ratio=float(ratio) if ratio is not None else None,
                         service_name=service_name)


def _is_http_url(raw: str) -> bool:
    try:
        parts = urlsplit(raw)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _limits(r: Reader, table: Mapping[str, Any], path: str,
            default: ListenerLimits) -> ListenerLimits:
    """A listener's caps: ``max_connections`` and (where the table allows it)
    ``max_connections_per_source``, each a positive count; the second at most the first."""
    total = _count(r, table, "max_connections", path, default.max_connections)
    per_source = _count(r, table, "max_connections_per_source", path, default.max_per_source)
    if "max_connections_per_source" not in table and isinstance(total, int) \
            and per_source is not None:
        per_source = min(per_source, total)  # the default never exceeds a lower listener cap
    if isinstance(per_source, int) and isinstance(total, int) and per_source > total:
        r.problem(f"{path}.max_connections_per_source",
                  f"{per_source} is more than {path}.max_connections ({total}): a source "
                  "could never reach it")
    return ListenerLimits(total or default.max_connections, per_source)


def _count(r: Reader, table: Mapping[str, Any], key: str, path: str, default: Any) -> Any:
    value = r.get(table, key, path, int, default)
    if isinstance(value, int) and value is not default and value < 1:
        r.problem(f"{path}.{key}", f"expected a positive number of connections, got {value}")
        return default
    return value


def _labels(r: Reader, data: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """``labels = { zone = "eu-1" }``: names and values follow the mesh's name rule (they
    travel in the registry's service ``Meta`` and are compared as they are)."""
    table = r.get(data, "labels", "", dict, {}) or {}
    out: list[tuple[str, str]] = []
    for name, value in table.items():
        if not is_valid_name(name):
            r.problem(f"labels.{name}", f"invalid label name {name!r} ({NAME_RULE})")
        elif not isinstance(value, str) or not is_valid_name(value):
            r.problem(f"labels.{name}", f"invalid label value {value!r} ({NAME_RULE})")
        else:
            out.append((name, value))
    return tuple(sorted(out))


def _registry_url(r: Reader, raw: str | None) -> str:
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


def _registry_token_file(r: Reader, data: Mapping[str, Any], base: Path) -> Path | None:
    """The token file's path (its content is read by ``load_host_config``): one of
    ``registry_token`` and ``registry_token_file``, never both."""
    raw = r.get(data, "registry_token_file", "", str, None)
    if raw is None:
        return None
    if not raw.strip():
        r.problem("registry_token_file", "expected the path of a file holding the ACL token")
        return None
    if data.get("registry_token"):
        r.problem("registry_token_file",
                  "registry_token is set too: give the token in one place")
        return None
    return base / str(raw)


def _parse_ca(r: Reader, raw: Mapping[str, Any] | None, base: Path) -> CASettings | None:
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


PROTOCOLS = ["http", "http2", "grpc", "tcp"]
SERVICE_KEYS = {"name", "port", "protocol", "version", "address", "health", "upstreams", "mtls"}


def _parse_local_service(r: Reader, raw: Mapping[str, Any], path: str) -> LocalService | None:
    before = len(r.problems)
    r.unknown_keys(raw, path, SERVICE_KEYS)
    name = r.name(raw, "name", path)
    port = r.port(raw, "port", path)
    protocol = r.choice(raw, "protocol", path, Protocol, PROTOCOLS, Protocol.HTTP)
    mtls = r.choice(raw, "mtls", path, MTLSMode, ["strict", "permissive"], MTLSMode.STRICT)
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
        uproto = r.choice(up, "protocol", upath, Protocol, PROTOCOLS, Protocol.HTTP)
        if uname is not None and uport is not None and uproto is not None:
            upstreams.append(Upstream(uname, uport, uproto))
    if len(r.problems) != before:
        return None
    return LocalService(name=name, port=port, protocol=protocol, version=version,
                        address=address, health=health,
                        upstreams=tuple(upstreams), mtls=mtls)


def _parse_health(r: Reader, raw: Mapping[str, Any], path: str) -> HealthCheck:
    r.unknown_keys(raw, path, {"http", "grpc", "tcp", "none", "interval", "timeout"})
    interval = r.duration(raw, "interval", path, 5.0)
    timeout = r.duration(raw, "timeout", path, 2.0)
    kinds = [k for k in ("http", "grpc", "tcp", "none") if k in raw]
    if len(kinds) > 1:
        r.problem(path, f"choose one check kind, got {' and '.join(kinds)}")
        return HealthCheck()
    if "http" in raw:
        hpath = r.get(raw, "http", path, str)
        if isinstance(hpath, str) and not hpath.startswith("/"):
            r.problem(f"{path}.http", f"expected a path starting with '/', got {hpath!r}")
        return HealthCheck("http", hpath or "/", interval or 5.0, timeout or 2.0)
    if "grpc" in raw:  # the gRPC service to ask about ("": the server as a whole)
        name = r.get(raw, "grpc", path, str)
        if isinstance(name, str) and not all(c.isalnum() or c in "._-" for c in name):
            r.problem(f"{path}.grpc", f"expected a gRPC service name, got {name!r}")
        return HealthCheck("grpc", name or "", interval or 5.0, timeout or 2.0)
    if "none" in raw:
        r.get(raw, "none", path, bool)
        return HealthCheck("none", "/", interval or 5.0, timeout or 2.0)
    if "tcp" in raw:
        r.get(raw, "tcp", path, bool)
    return HealthCheck("tcp", "/", interval or 5.0, timeout or 2.0)


def _check_local_uniqueness(
    r: Reader, services: list[LocalService], listeners: list[tuple[str, int, str]]
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


def _check_permissive(r: Reader, services: list[LocalService]) -> None:
    """Plaintext on the shared inbound port carries no SNI, so it can only go to one service:
    at most one service per host may be permissive."""
    permissive = [i for i, s in enumerate(services) if s.mtls is MTLSMode.PERMISSIVE]
    for i in permissive[1:]:
        r.problem(f"services[{i}].mtls",
                  f"only one service per host can be permissive (services[{permissive[0]}] "
                  "is): plaintext on the inbound port cannot say which service it is for")


def _overlap(a: str, b: str) -> bool:
    """Whether two bind addresses collide ("" = the outbound address, compared by port only:
    upstream listeners and apps on the same port of any loopback address confuse operators)."""
    wildcard = ("", "0.0.0.0", "::")
    return a == b or a in wildcard or b in wildcard
