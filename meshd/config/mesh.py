"""``mesh.toml``: a whole mesh on one machine, for ``meshd up``.

Pure: a mapping in, a frozen ``MeshConfig`` (``meshd.config.mesh_schema``) out, or a ``ConfigError``
listing every problem with its key path; ``meshd.dev.generate`` turns the tree back into one
``meshd.toml`` per simulated host. The services of each host are validated by generating that
host's ``meshd.toml`` mapping and handing it to
``meshd.config.host.parse_host_config``, so ``meshd up`` and ``meshd run`` can never disagree about
what a service declaration means; problems it finds are translated back to ``mesh.toml`` key paths.
The keys of ``mesh.toml`` itself are checked with the same toolkit (``meshd.config.reader``).

The format (also in ``meshd up --help`` and ``examples/shop/README.md``)::

    trust_domain = "shop.mesh"          # required
    registry = "127.0.0.1:8500"         # where the embedded registry listens (default)
    ca = "127.0.0.1:8443"               # where the CA listens (default)
    routes = "routes.toml"              # optional, relative to this file; written to the KV
    run_dir = "/tmp/shop"               # optional; default: a fresh temporary directory
    try = ["curl -s http://127.0.0.1:8080/checkout"]   # optional hints printed when ready

    [[hosts]]
    name = "host-a"
    address = "127.0.0.2"               # a loopback address per simulated host
    inbound_port = 15001                # default 15001 (mTLS listener, on `address`)
    admin_port = 15000                  # default 15000 (admin API, on `address`)
    outbound_address = "127.0.0.1"      # default; where upstream listeners bind
    workers = 1                         # default 1 here (meshd.toml's default: "auto")

    [[hosts.services]]                  # the keys of meshd.toml's [[services]], plus `command`
    name = "web"
    port = 8080
    address = "127.0.0.1"               # default: the host's address
    command = ["{python}", "{here}/web.py", "--port", "{port}"]

    [[hosts.gateways]]                  # meshd.toml's [[gateways]]; an https listener may say
    name = "edge"                       # certificates = "generate" (made by `meshd up`)
    listeners = [{ port = 8000, address = "127.0.0.1" }]
    routes = [{ service = "web" }]

    [[external]]                        # a stand-in for a service outside the mesh
    name = "bank"                       # routes.toml declares destinations.bank as external
    address = "127.0.0.1"               # default
    port = 9443
    tls_name = "bank.shop.example"      # optional: meshd up makes a CA and a certificate
    command = ["{python}", "{here}/bank.py", "--port", "{port}", "--cert", "{cert}",
               "--key", "{key}"]        # also {address}, {name}, {ca}, {python}, {here}
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd.config.external import is_hostname
from meshd.config.gateway import GENERATED
from meshd.config.host import SERVICE_KEYS, parse_host_config, parse_workers
from meshd.config.mesh_schema import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_CA,
    DEFAULT_INBOUND_PORT,
    DEFAULT_OUTBOUND_ADDRESS,
    DEFAULT_REGISTRY,
    HostPort,
    MeshConfig,
    MeshExternal,
    MeshHost,
    MeshService,
    clashes,
    host_data,
    port_claims_of,
)
from meshd.config.reader import Reader
from meshd.errors import ConfigError

MESH_KEYS = {"trust_domain", "registry", "ca", "routes", "run_dir", "try", "hosts",
             "external"}
EXTERNAL_KEYS = {"name", "address", "port", "tls_name", "command"}
EXTERNAL_PLACEHOLDERS = frozenset({"python", "here", "address", "port", "name", "cert", "key",
                                   "ca"})
HOST_KEYS = {"name", "address", "inbound_port", "admin_port", "outbound_address", "services",
             "gateways", "workers"}
MESH_SERVICE_KEYS = SERVICE_KEYS | {"command"}
PLACEHOLDERS = frozenset({"python", "port", "address", "version", "name", "host", "here"})

# a syntactically valid stand-in used only while validating a host's services
_PLACEHOLDER_FINGERPRINT = "sha256:" + "0" * 64


def parse_mesh(data: Mapping[str, Any], file: str = "mesh.toml",
               base_dir: Path | None = None) -> MeshConfig:
    """Build a ``MeshConfig`` from a parsed ``mesh.toml``; paths in it are relative to
    ``base_dir`` (the file's directory). Raises ``ConfigError`` with every problem found."""
    base = base_dir or Path(".")
    r = Reader(file)
    r.unknown_keys(data, "", MESH_KEYS)
    trust_domain = r.trust_domain(data, "trust_domain", "")
    registry = _hostport(r, data.get("registry", DEFAULT_REGISTRY), "registry")
    ca = _hostport(r, data.get("ca", DEFAULT_CA), "ca")
    routes = _relative_path(r, data, "routes", base)
    run_dir = _relative_path(r, data, "run_dir", base)
    hints = _string_list(r, data, "try")

    hosts_raw = data.get("hosts")
    hosts: list[MeshHost] = []
    if hosts_raw is None:
        r.problem("hosts", "required key is missing (declare at least one [[hosts]])")
    elif not isinstance(hosts_raw, list) or not hosts_raw:
        r.problem("hosts", "expected a non-empty array of tables ([[hosts]])")
    else:
        context = _HostContext(
            file=file, base=base, trust_domain=trust_domain or "placeholder.mesh",
            registry=registry or HostPort("127.0.0.1", 8500),
            ca=ca or HostPort("127.0.0.1", 8443),
        )
        for i, raw in enumerate(hosts_raw):
            host = _parse_host(r, raw, f"hosts[{i}]", context)
            if host is not None:
                hosts.append(host)
        _check_host_names(r, hosts_raw)

    externals = _externals(r, data)
    if not r.problems:
        _check_upstreams_exist(r, hosts, externals)
        claims = port_claims_of(hosts, registry, ca, externals)
        for claim, other in clashes(claims):
            r.problem(claim.key_path, f"{claim} is also used by {other.owner} ({other.key_path})")

    r.fail_if_problems()
    assert trust_domain is not None and registry is not None and ca is not None
    return MeshConfig(trust_domain=trust_domain, hosts=tuple(hosts), registry=registry, ca=ca,
                      routes=routes, run_dir=run_dir, hints=hints, source=file,
                      externals=externals)


@dataclass(frozen=True)
class _HostContext:
    file: str
    base: Path
    trust_domain: str
    registry: HostPort
    ca: HostPort


def _parse_host(r: Reader, raw: Any, path: str, ctx: _HostContext) -> MeshHost | None:
    if not isinstance(raw, dict):
        r.problem(path, "expected a table ([[hosts]])")
        return None
    before = len(r.problems)
    r.unknown_keys(raw, path, HOST_KEYS)
    name = r.name(raw, "name", path)
    address = r.ip(raw, "address", path)
    outbound = r.ip(raw, "outbound_address", path, DEFAULT_OUTBOUND_ADDRESS)
    inbound_port = r.port(raw, "inbound_port", path, DEFAULT_INBOUND_PORT)
    admin_port = r.port(raw, "admin_port", path, DEFAULT_ADMIN_PORT)
    workers = parse_workers(r, raw.get("workers", 1), f"{path}.workers")
    if inbound_port is not None and inbound_port == admin_port:
        r.problem(f"{path}.admin_port", f"port {admin_port} is also the inbound port")

    services_raw = raw.get("services", [])
    if not isinstance(services_raw, list):
        r.problem(f"{path}.services", "expected an array of tables ([[hosts.services]])")
        services_raw = []
    elif not services_raw:
        # its join token has to name at least one service it may claim
        r.problem(f"{path}.services", "declare at least one service ([[hosts.services]])")
    commands: list[tuple[str, ...]] = []
    service_tables: list[dict[str, Any]] = []
    index_of: list[int] = []   # position in service_tables -> position in mesh.toml
    for j, svc in enumerate(services_raw):
        spath = f"{path}.services[{j}]"
        if not isinstance(svc, dict):
            r.problem(spath, "expected a table ([[hosts.services]])")
            continue
        r.unknown_keys(svc, spath, MESH_SERVICE_KEYS)
        commands.append(_command(r, svc, spath))
        table = {k: v for k, v in svc.items() if k in SERVICE_KEYS}
        if isinstance(address, str):
            table.setdefault("address", address)
        service_tables.append(table)
        index_of.append(j)
    if len(r.problems) != before or not isinstance(name, str) or not isinstance(address, str):
        return None

    host = MeshHost(name=name, address=address, inbound_port=inbound_port,
                    admin_port=admin_port, outbound_address=outbound, workers=workers)
    data = host_data(host, ctx.trust_domain, ctx.registry, ctx.ca, _PLACEHOLDER_FINGERPRINT)
    data["services"] = service_tables
    if "gateways" in raw:
        data["gateways"] = _gateway_tables(raw["gateways"])
    try:
        parsed = parse_host_config(data, ctx.file, ctx.base, generated=True)
    except ConfigError as exc:
        for p in exc.problems:
            r.problem(_host_path(p.path, path, index_of), p.reason)
        return None
    services = tuple(MeshService(s, c) for s, c in zip(parsed.services, commands, strict=True))
    return MeshHost(name=name, address=address, inbound_port=inbound_port,
                    admin_port=admin_port, outbound_address=outbound, services=services,
                    gateways=parsed.gateways, workers=workers)


def _gateway_tables(raw: Any) -> Any:
    """``[[hosts.gateways]]`` as meshd.toml's ``[[gateways]]``: an https listener saying
    ``certificates = "generate"`` gets a certificate ``meshd up`` makes (for ``localhost``,
    ``127.0.0.1`` and ``::1``, signed by a CA of the run, whose file it prints)."""
    if not isinstance(raw, list):
        return raw
    out = []
    for gateway in raw:
        if isinstance(gateway, dict) and isinstance(gateway.get("listeners"), list):
            listeners = []
            for listener in gateway["listeners"]:
                if isinstance(listener, dict) and listener.get("certificates") == "generate":
                    listener = {**listener, "certificates": [{
                        "cert": str(GENERATED / "gateway.crt"),
                        "key": str(GENERATED / "gateway.key"),
                        "hosts": ["localhost"]}]}
                listeners.append(listener)
            gateway = {**gateway, "listeners": listeners}
        out.append(gateway)
    return out


_HOST_KEY_PATHS = {"node": "name", "address": "address", "inbound.port": "inbound_port",
                   "admin.address": "admin_port", "outbound.address": "outbound_address"}
_SERVICE_INDEX = re.compile(r"^services\[(\d+)\]")


def _host_path(host_path: str, prefix: str, index_of: list[int]) -> str:
    """A key path in a generated meshd.toml -> the same place in mesh.toml."""
    match = _SERVICE_INDEX.match(host_path)
    if match:
        j = index_of[int(match.group(1))]
        return f"{prefix}.services[{j}]{host_path[match.end():]}"
    if host_path in _HOST_KEY_PATHS:
        return f"{prefix}.{_HOST_KEY_PATHS[host_path]}"
    if host_path in ("trust_domain", "registry"):
        return host_path
    if host_path.startswith("ca"):
        return "ca"
    return prefix


def _externals(r: Reader, data: Mapping[str, Any]) -> tuple[MeshExternal, ...]:
    """``[[external]]``: stand-ins for services outside the mesh (``MeshExternal``)."""
    raw = data.get("external", [])
    if not isinstance(raw, list):
        r.problem("external", "expected an array of tables ([[external]])")
        return ()
    out: list[MeshExternal] = []
    for i, item in enumerate(raw):
        path = f"external[{i}]"
        if not isinstance(item, dict):
            r.problem(path, "expected a table ([[external]])")
            continue
        before = len(r.problems)
        r.unknown_keys(item, path, EXTERNAL_KEYS)
        name = r.name(item, "name", path)
        address = r.ip(item, "address", path, "127.0.0.1")
        port = r.port(item, "port", path)
        tls_name = r.get(item, "tls_name", path, str, None)
        if tls_name is not None and not is_hostname(tls_name):
            r.problem(f"{path}.tls_name", f"expected a DNS name in lower case, got {tls_name!r}")
        if "command" not in item:
            r.problem(f"{path}.command", "required key is missing")
        command = _command(r, item, path, EXTERNAL_PLACEHOLDERS)
        if tls_name is None and any(f"{{{p}}}" in arg for arg in command
                                    for p in ("cert", "key", "ca")):
            r.problem(f"{path}.command", "{cert}, {key} and {ca} need tls_name (the name "
                      "meshd up makes a certificate for)")
        if name in {e.name for e in out}:
            r.problem(f"{path}.name", f"external {name!r} declared twice")
        if len(r.problems) == before:
            out.append(MeshExternal(name, address, port, command, tls_name))
    return tuple(out)


def _command(r: Reader, svc: Mapping[str, Any], path: str,
             placeholders: frozenset[str] = PLACEHOLDERS) -> tuple[str, ...]:
    raw = svc.get("command")
    if raw is None:
        return ()
    where = f"{path}.command"
    if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
        r.problem(where, "expected a non-empty array of strings (the argv of the app)")
        return ()
    for k, arg in enumerate(raw):
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
        except ValueError as exc:
            r.problem(f"{where}[{k}]", f"{exc} (write a literal brace as {{{{ or }}}})")
            continue
        for field in fields:
            if field not in placeholders:
                r.problem(f"{where}[{k}]", f"unknown placeholder {{{field}}} (known: "
                          f"{', '.join('{' + p + '}' for p in sorted(placeholders))})")
    return tuple(raw)


def _hostport(r: Reader, raw: Any, path: str) -> HostPort | None:
    pair = r.hostport(raw, path)
    return HostPort(*pair) if pair is not None else None


def _relative_path(r: Reader, data: Mapping[str, Any], key: str, base: Path) -> Path | None:
    raw = data.get(key)
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw:
        r.problem(key, "expected a path (a non-empty string)")
        return None
    return base / Path(raw).expanduser()


def _string_list(r: Reader, data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    raw = data.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        r.problem(key, "expected an array of strings")
        return ()
    return tuple(raw)


def _check_host_names(r: Reader, hosts_raw: list[Any]) -> None:
    seen: dict[Any, int] = {}
    for i, raw in enumerate(hosts_raw):
        if not isinstance(raw, dict):
            continue
        name = raw.get("name")
        if isinstance(name, str) and name in seen:
            r.problem(f"hosts[{i}].name", f"duplicate host {name!r} (also hosts[{seen[name]}])")
        if isinstance(name, str):
            seen.setdefault(name, i)


def _check_upstreams_exist(r: Reader, hosts: list[MeshHost],
                           externals: tuple[MeshExternal, ...] = ()) -> None:
    provided = {ms.service.name for h in hosts for ms in h.services}
    provided |= {e.name for e in externals}
    for i, host in enumerate(hosts):
        for j, ms in enumerate(host.services):
            for k, up in enumerate(ms.service.upstreams):
                if up.name not in provided:
                    r.problem(f"hosts[{i}].services[{j}].upstreams[{k}].name",
                              f"no host in this mesh runs service {up.name!r}")
