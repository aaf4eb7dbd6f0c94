"""Generated files of ``meshd up``: each simulated host's ``meshd.toml`` (as a mapping, and as
TOML text) and each app's argv. Pure."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshd.config.durations import format_duration
from meshd.config.gateway import Gateway
from meshd.config.mesh_schema import MeshConfig, MeshHost, host_data
from meshd.config.schema import LocalService, MTLSMode


def host_config_data(mesh: MeshConfig, host: MeshHost, *, fingerprint: str,
                     token_file: str = "join-token", state_dir: str = "state",
                     registry_token_file: str | None = None) -> dict[str, Any]:
    """The ``meshd.toml`` mapping of one simulated host (paths relative to that file)."""
    data = host_data(host, mesh.trust_domain, mesh.registry, mesh.ca, fingerprint,
                     token_file=token_file, state_dir=state_dir)
    if registry_token_file is not None:
        data["registry_token_file"] = registry_token_file
    data["services"] = [service_data(ms.service) for ms in host.services]
    if host.gateways:
        data["gateways"] = [gateway_data(g) for g in host.gateways]
    return data


def gateway_data(gateway: Gateway) -> dict[str, Any]:
    """The ``[[gateways]]`` mapping of a gateway; ``parse_host_config`` reads it back equal."""
    listeners = []
    for x in gateway.listeners:
        listener: dict[str, Any] = {"port": x.port, "address": x.address,
                                    "protocol": x.protocol}
        if x.redirect_https is not None:
            listener["redirect_https"] = x.redirect_https
        if x.certificates:
            listener["certificates"] = [{"cert": str(c.cert), "key": str(c.key),
                                         "hosts": list(c.hosts)} for c in x.certificates]
        listeners.append(listener)
    return {"name": gateway.name, "listeners": listeners,
            "routes": [{"service": r.service, "hosts": list(r.hosts),
                        "path_prefix": r.path_prefix} for r in gateway.routes]}


def service_data(svc: LocalService) -> dict[str, Any]:
    """The ``[[services]]`` mapping of a service; ``parse_host_config`` reads it back equal."""
    health: dict[str, Any] = {}
    if svc.health.kind == "http":
        health["http"] = svc.health.path
    elif svc.health.kind == "grpc":
        health["grpc"] = svc.health.path
    else:
        health[svc.health.kind] = True
    health["interval"] = format_duration(svc.health.interval)
    health["timeout"] = format_duration(svc.health.timeout)
    data: dict[str, Any] = {
        "name": svc.name, "port": svc.port, "address": svc.address,
        "protocol": svc.protocol.value, "version": svc.version,
        "health": health,
    }
    if svc.mtls is not MTLSMode.STRICT:
        data["mtls"] = svc.mtls.value
    if svc.upstreams:
        data["upstreams"] = [
            {"name": u.name, "local_port": u.local_port, "protocol": u.protocol.value}
            for u in svc.upstreams
        ]
    return data


def render_toml(data: Mapping[str, Any], header: str = "") -> str:
    """TOML text for the small shape of a meshd.toml: scalars, arrays of scalars, tables at the
    top, arrays of tables, and (inside those) tables of scalars written inline."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    _emit_table(lines, data, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit_table(lines: list[str], table: Mapping[str, Any], prefix: str) -> None:
    nested = bool(prefix)
    for key, value in table.items():
        if _is_table_array(value) or (isinstance(value, Mapping) and not nested):
            continue
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        if isinstance(value, Mapping) and not nested:
            lines += ["", f"[{prefix}{_key(key)}]"]
            _emit_table(lines, value, "")
    for key, value in table.items():
        if _is_table_array(value):
            for item in value:
                lines += ["", f"[[{prefix}{_key(key)}]]"]
                _emit_table(lines, item, f"{prefix}{_key(key)}.")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _string(s: str) -> str:
    # JSON's escapes (\" \\ \n \t \uXXXX for control characters) are all valid in TOML basic
    # strings; ensure_ascii=False avoids surrogate-pair escapes, which TOML does not have.
    return json.dumps(s, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def expand_command(template: tuple[str, ...], *, host: MeshHost, service: LocalService,
                   python: str, here: Path) -> list[str]:
    """The argv of an app, with its placeholders filled in."""
    values = {"python": python, "port": str(service.port), "address": service.address,
              "version": service.version, "name": service.name, "host": host.name,
              "here": str(here)}
    return [arg.format(**values) for arg in template]
