"""Validation of agent service and check definitions, and their conversion to records.

Input is what ``store.decode`` returns (dicts keyed by Go names); output is ``Service``/``Check``
records without indexes. Error texts are Consul's (see docs/consul-api.md §4.1, §5 and §13).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from meshd.registry.embedded.store.records import CHECK_STATUSES, CRITICAL, ApiError, Check, Service

PROXY_KINDS = ("connect-proxy", "mesh-gateway", "terminating-gateway", "ingress-gateway",
               "api-gateway")
SERVICE_KINDS = ("", *PROXY_KINDS)
DEFAULT_OUTPUT_MAX = 4096
DEFAULT_CHECK_TIMEOUT = 10.0

_META_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _bad(text: str) -> ApiError:
    return ApiError(400, text)


def _validate_meta(meta: Mapping[str, str]) -> None:
    if len(meta) > 64:
        raise _bad("Invalid Service Meta: Service metadata cannot contain more than 64 key/value "
                   "pairs")
    for key, value in meta.items():
        if not key:
            reason = "Key cannot be blank"
        elif len(key) > 128:
            reason = "Key name too long (limit: 128 characters)"
        elif not _META_KEY.match(key):
            reason = "Key contains invalid characters"
        elif key.startswith("consul-"):
            reason = "Key prefix 'consul-' is reserved for internal use"
        elif len(value) > 512:
            reason = "Value is too long (limit: 512 characters)"
        else:
            continue
        raise _bad(f"Invalid Service Meta: {reason}")


def _auto_tagged_addresses(
    address: str, port: int, given: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return given
    suffix = "ipv4" if ip.version == 4 else "ipv6"
    out = dict(given)
    for name in (f"lan_{suffix}", f"wan_{suffix}"):
        out.setdefault(name, {"Address": address, "Port": port})
    return out


def service_from_definition(defn: Mapping[str, Any]) -> tuple[Service, list[Check]]:
    """Build the service record and its checks (auto IDs applied, status not yet merged)."""
    name = defn.get("Name", "")
    if not name:
        raise _bad("Missing service name")
    service_id = defn.get("ID") or name
    address = defn.get("Address", "")
    if address in ("0.0.0.0", "::", "[::]"):
        raise _bad("Invalid service address")
    meta = dict(defn.get("Meta", {}))
    _validate_meta(meta)
    weights_in = defn.get("Weights")
    weights = (1, 1)
    if weights_in is not None:
        weights = (weights_in.get("Passing", 0), weights_in.get("Warning", 0))
        if weights[0] < 1:
            raise _bad("Invalid Weights: Passing must be greater than 0")
        if weights[1] < 0:
            raise _bad("Invalid Weights: Warning must be greater or equal than 0")
    kind = defn.get("Kind", "")
    if kind not in SERVICE_KINDS:
        raise _bad(f'Invalid service kind: "{kind}"')
    port = defn.get("Port", 0)
    proxy: dict[str, Any] | None = None
    if kind in PROXY_KINDS:
        proxy = dict(defn.get("Proxy", {}))
        if kind == "connect-proxy":
            if not proxy.get("DestinationServiceName"):
                raise _bad("Invalid Service: Proxy.DestinationServiceName must be non-empty for "
                           "Connect proxy services")
            if not port and not defn.get("SocketPath"):
                raise _bad("Invalid Service: Port or SocketPath must be set for a Connect proxy")
    connect_in = defn.get("Connect") or {}
    if "SidecarService" in connect_in:
        raise _bad("Invalid Service: Connect.SidecarService is not supported by the embedded "
                   "registry; register the connect-proxy service explicitly")
    connect = {"Native": True} if connect_in.get("Native") else None
    locality = defn.get("Locality")
    tagged = {
        k: {"Address": v.get("Address", ""), "Port": v.get("Port", 0)}
        for k, v in defn.get("TaggedAddresses", {}).items()
    }
    service = Service(
        id=service_id,
        name=name,
        tags=tuple(defn.get("Tags", ())),
        address=address,
        port=port,
        meta=meta,
        tagged_addresses=_auto_tagged_addresses(address, port, tagged),
        weights=weights,
        enable_tag_override=bool(defn.get("EnableTagOverride", False)),
        kind=kind,
        proxy=proxy,
        connect=connect,
        socket_path=defn.get("SocketPath", ""),
        locality=dict(locality) if locality else None,
    )
    defs = ([defn["Check"]] if "Check" in defn else []) + list(defn.get("Checks", ()))
    checks = []
    for position, check_def in enumerate(defs, start=1):
        check_id = check_def.get("CheckID") or check_def.get("ID")
        if not check_id:
            check_id = f"service:{service_id}" + (f":{position}" if len(defs) > 1 else "")
        status = check_def.get("Status", "")
        if status and status not in CHECK_STATUSES:
            raise _bad("Status for checks must 'passing', 'warning', 'critical'")
        checks.append(check_from_definition(
            check_def, check_id=check_id, service_id=service_id,
            default_name=f"Service '{name}' check",
        ))
    return service, checks


def check_from_definition(
    defn: Mapping[str, Any], *, check_id: str, service_id: str, default_name: str
) -> Check:
    """Validate a check definition; raises ``ApiError`` with Consul's texts."""
    ttl = defn.get("TTL", 0.0)
    interval = defn.get("Interval", 0.0)
    check_type = _check_type(defn)
    if interval > 0 and ttl > 0:
        raise _bad("Invalid check: Interval and TTL cannot both be specified")
    if check_type in ("script", "docker"):
        raise ApiError(500, "Scripts are disabled on this agent from remote calls; to enable, "
                       "configure 'enable_script_checks' or 'enable_local_script_checks' to true")
    if check_type in ("http", "tcp", "udp", "grpc", "h2ping", "os_service") and interval <= 0:
        raise _bad("Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or "
                   "OSService checks")
    if check_type == "ttl" and ttl <= 0:
        raise _bad("Invalid check: TTL must be > 0 for TTL checks")
    if check_type == "":
        raise _bad("Invalid check: Must provide TTL or Script/DockerContainerID/HTTP/TCP and "
                   "Interval")
    if defn.get("FailuresBeforeWarning", 0) > defn.get("FailuresBeforeCritical", 0):
        raise _bad("Invalid check: FailuresBeforeWarning can't be higher than "
                   "FailuresBeforeCritical")
    definition = {
        k: v for k, v in defn.items()
        if k in ("HTTP", "Method", "Header", "Body", "DisableRedirects", "TCP", "TCPUseTLS",
                 "UDP", "GRPC", "GRPCUseTLS", "H2PING", "H2PingUseTLS", "OSService",
                 "TLSServerName", "TLSSkipVerify", "AliasNode", "AliasService",
                 "SuccessBeforePassing", "FailuresBeforeWarning", "FailuresBeforeCritical")
    }
    return Check(
        id=check_id,
        name=defn.get("Name") or default_name,
        status=defn.get("Status") or CRITICAL,
        notes=defn.get("Notes", ""),
        service_id=service_id,
        type=check_type,
        ttl=ttl if check_type == "ttl" else 0.0,
        interval=interval,
        timeout=defn.get("Timeout", 0.0) or (DEFAULT_CHECK_TIMEOUT if interval > 0 else 0.0),
        deregister_critical_after=defn.get("DeregisterCriticalServiceAfter", 0.0),
        output_max_size=defn.get("OutputMaxSize", 0) or DEFAULT_OUTPUT_MAX,
        definition=definition,
    )


def _check_type(defn: Mapping[str, Any]) -> str:
    if defn.get("ScriptArgs"):
        return "script"
    if defn.get("DockerContainerID"):
        return "docker"
    for key, name in (("HTTP", "http"), ("TCP", "tcp"), ("UDP", "udp"), ("GRPC", "grpc"),
                      ("H2PING", "h2ping"), ("OSService", "os_service")):
        if defn.get(key):
            return name
    if defn.get("AliasService") or defn.get("AliasNode"):
        return "alias"
    if "TTL" in defn:
        return "ttl"
    return ""


def truncate_output(output: str, max_size: int) -> str:
    """Cut ``output`` to ``max_size`` bytes the way the agent does."""
    raw = output.encode()
    if len(raw) <= max_size:
        return output
    kept = raw[:max_size].decode(errors="ignore")
    return f"{kept} ... (captured {max_size} of {len(raw)} bytes)"
