"""Request-body decoding with the tolerance (and the strictness) of Consul's Go decoder.

Consul decodes JSON bodies with ``encoding/json`` and "disallow unknown fields": a key matches a
field by exact name first, then case-insensitively; a few snake_case aliases are translated first;
any other key is a 400 ``Request decode failed: json: unknown field "<name>"``. Durations are Go
duration strings or integer nanoseconds. Clients differ wildly in spelling (py-consul sends
``name``/``serviceid``/``DeregisterCriticalServiceAfter`` in one body), so this module is the one
place that knows the rules. It returns plain dicts keyed by the canonical Go names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from meshd.durations import format_go_duration, parse_go_duration
from meshd.registry.embedded.store.records import ApiError


class DecodeError(ApiError):
    """The body could not be decoded: a 400 ``Request decode failed: <detail>``."""

    def __init__(self, detail: str) -> None:
        super().__init__(400, f"Request decode failed: {detail}")


# A field type: a scalar tag, a nested schema, or a ("list"|"map", element type) pair.
FieldType = Union[str, "Schema", tuple[str, "FieldType"]]

_GO_TYPES = {
    "str": "string", "int": "int", "bool": "bool", "duration": "time.Duration",
    "any": "interface {}", "float": "float64",
}


@dataclass(frozen=True)
class Schema:
    go_name: str
    fields: Mapping[str, FieldType]
    aliases: Mapping[str, str] = field(default_factory=dict)

    def lookup(self, key: str) -> str | None:
        if key in self.fields:
            return key
        alias = self.aliases.get(key)
        if alias is not None:
            return alias
        folded = key.lower()
        for name in self.fields:
            if name.lower() == folded:
                return name
        for name, target in self.aliases.items():
            if name.lower() == folded:
                return target
        return None


def _go_type(ftype: FieldType) -> str:
    if isinstance(ftype, Schema):
        return ftype.go_name
    if isinstance(ftype, tuple):
        kind, inner = ftype
        return ("[]" if kind == "list" else "map[string]") + _go_type(inner)
    return _GO_TYPES[ftype]


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def parse_json_body(body: bytes) -> Any:
    if not body.strip():
        raise DecodeError("EOF")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"invalid character in JSON body: {exc}") from exc


def decode_body(schema: Schema, body: bytes) -> dict[str, Any]:
    obj = parse_json_body(body)
    if not isinstance(obj, dict):
        raise DecodeError(
            f"json: cannot unmarshal {_json_kind(obj)} into Go value of type {schema.go_name}"
        )
    return decode_object(schema, obj)


def decode_object(schema: Schema, obj: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = schema.lookup(key)
        if name is None:
            raise DecodeError(f'json: unknown field "{key}"')
        if value is None:
            out.pop(name, None)  # Go leaves the zero value
            continue
        out[name] = _decode_value(schema.fields[name], value, f"{schema.go_name}.{name}")
    return out


def _decode_value(ftype: FieldType, value: Any, where: str) -> Any:
    def mismatch() -> DecodeError:
        return DecodeError(
            f"json: cannot unmarshal {_json_kind(value)} into Go struct field {where} "
            f"of type {_go_type(ftype)}"
        )

    if isinstance(ftype, Schema):
        if not isinstance(value, dict):
            raise mismatch()
        return decode_object(ftype, value)
    if isinstance(ftype, tuple):
        kind, inner = ftype
        if kind == "list":
            if not isinstance(value, list):
                raise mismatch()
            return [_decode_value(inner, item, where) for item in value if item is not None]
        if not isinstance(value, dict):
            raise mismatch()
        return {str(k): _decode_value(inner, v, where) for k, v in value.items() if v is not None}
    if ftype == "any":
        return value
    if ftype == "str":
        if not isinstance(value, str):
            raise mismatch()
        return value
    if ftype == "bool":
        if not isinstance(value, bool):
            raise mismatch()
        return value
    if ftype == "int":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise mismatch()
        if isinstance(value, float) and not value.is_integer():
            raise DecodeError(
                f"json: cannot unmarshal number {value} into Go struct field {where} of type int"
            )
        return int(value)
    if ftype == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise mismatch()
        return float(value)
    if ftype == "duration":
        if isinstance(value, str):
            return parse_duration(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise mismatch()
        return float(value) / 1e9
    raise AssertionError(f"unknown field type {ftype!r}")


# --- Go durations: the grammar is meshd.durations', the error texts are the API's -----------------


def parse_duration(text: str) -> float:
    seconds = parse_go_duration(text)
    if seconds is None:
        raise DecodeError(f'time: invalid duration "{text}"')
    return seconds


def format_duration(seconds: float) -> str:
    """Go's ``Duration.String()`` (``10s``, ``1m30s``, ``1h0m0s``), but ``""`` for zero, as
    Consul renders an unset interval."""
    text = format_go_duration(seconds)
    return "" if text == "0s" else text


# --- Schemas for the bodies of this API subset ---------------------------------------------------

_CHECK_FIELDS: dict[str, FieldType] = {
    "CheckID": "str", "ID": "str", "Name": "str", "Notes": "str", "Status": "str",
    "ServiceID": "str", "TTL": "duration", "HTTP": "str", "Method": "str",
    "Header": ("map", ("list", "str")), "Body": "str", "DisableRedirects": "bool",
    "TCP": "str", "TCPUseTLS": "bool", "UDP": "str", "GRPC": "str", "GRPCUseTLS": "bool",
    "H2PING": "str", "H2PingUseTLS": "bool", "OSService": "str",
    "ScriptArgs": ("list", "str"), "Shell": "str", "DockerContainerID": "str",
    "Interval": "duration", "Timeout": "duration", "TLSServerName": "str",
    "TLSSkipVerify": "bool", "DeregisterCriticalServiceAfter": "duration",
    "SuccessBeforePassing": "int", "FailuresBeforeWarning": "int",
    "FailuresBeforeCritical": "int", "OutputMaxSize": "int", "AliasNode": "str",
    "AliasService": "str", "Namespace": "str", "Partition": "str",
}
_CHECK_ALIASES = {
    "args": "ScriptArgs", "script_args": "ScriptArgs",
    "deregister_critical_service_after": "DeregisterCriticalServiceAfter",
    "docker_container_id": "DockerContainerID", "tls_server_name": "TLSServerName",
    "tls_skip_verify": "TLSSkipVerify", "grpc_use_tls": "GRPCUseTLS",
    "h2ping_use_tls": "H2PingUseTLS", "service_id": "ServiceID", "check_id": "CheckID",
    "output_max_size": "OutputMaxSize", "success_before_passing": "SuccessBeforePassing",
    "failures_before_warning": "FailuresBeforeWarning",
    "failures_before_critical": "FailuresBeforeCritical", "alias_service": "AliasService",
    "alias_node": "AliasNode", "os_service": "OSService", "tcp_use_tls": "TCPUseTLS",
    "disable_redirects": "DisableRedirects",
}
CHECK_SCHEMA = Schema("structs.CheckDefinition", _CHECK_FIELDS, _CHECK_ALIASES)

CHECK_UPDATE_SCHEMA = Schema("agent.checkUpdate", {"Status": "str", "Output": "str"})

_MESH_GATEWAY = Schema("structs.MeshGatewayConfig", {"Mode": "str"})
_UPSTREAM = Schema(
    "structs.Upstream",
    {
        "DestinationType": "str", "DestinationNamespace": "str", "DestinationPartition": "str",
        "DestinationPeer": "str", "DestinationName": "str", "Datacenter": "str",
        "LocalBindAddress": "str", "LocalBindPort": "int", "LocalBindSocketPath": "str",
        "LocalBindSocketMode": "str", "Config": ("map", "any"), "MeshGateway": _MESH_GATEWAY,
        "CentrallyConfigured": "bool",
    },
    {
        "destination_type": "DestinationType", "destination_namespace": "DestinationNamespace",
        "destination_partition": "DestinationPartition", "destination_peer": "DestinationPeer",
        "destination_name": "DestinationName", "local_bind_address": "LocalBindAddress",
        "local_bind_port": "LocalBindPort", "local_bind_socket_path": "LocalBindSocketPath",
        "local_bind_socket_mode": "LocalBindSocketMode", "mesh_gateway": "MeshGateway",
    },
)
_EXPOSE_PATH = Schema(
    "structs.ExposePath",
    {"ListenerPort": "int", "Path": "str", "LocalPathPort": "int", "Protocol": "str"},
    {"listener_port": "ListenerPort", "local_path_port": "LocalPathPort"},
)
_EXPOSE = Schema("structs.ExposeConfig", {"Checks": "bool", "Paths": ("list", _EXPOSE_PATH)})
_TPROXY = Schema(
    "structs.TransparentProxyConfig",
    {"OutboundListenerPort": "int", "DialedDirectly": "bool"},
    {"outbound_listener_port": "OutboundListenerPort", "dialed_directly": "DialedDirectly"},
)
PROXY_SCHEMA = Schema(
    "structs.ConnectProxyConfig",
    {
        "DestinationServiceName": "str", "DestinationServiceID": "str",
        "LocalServiceAddress": "str", "LocalServicePort": "int",
        "LocalServiceSocketPath": "str", "Mode": "str", "TransparentProxy": _TPROXY,
        "Config": ("map", "any"), "Upstreams": ("list", _UPSTREAM), "MeshGateway": _MESH_GATEWAY,
        "Expose": _EXPOSE,
    },
    {
        "destination_service_name": "DestinationServiceName",
        "destination_service_id": "DestinationServiceID",
        "local_service_address": "LocalServiceAddress", "local_service_port": "LocalServicePort",
        "local_service_socket_path": "LocalServiceSocketPath",
        "transparent_proxy": "TransparentProxy", "mesh_gateway": "MeshGateway",
    },
)
_CONNECT = Schema(
    "structs.ServiceConnect",
    {"Native": "bool", "SidecarService": ("map", "any")},
    {"sidecar_service": "SidecarService"},
)
_SERVICE_ADDRESS = Schema("structs.ServiceAddress", {"Address": "str", "Port": "int"})
SERVICE_SCHEMA = Schema(
    "structs.ServiceDefinition",
    {
        "Kind": "str", "ID": "str", "Name": "str", "Tags": ("list", "str"), "Address": "str",
        "TaggedAddresses": ("map", _SERVICE_ADDRESS), "Meta": ("map", "str"), "Port": "int",
        "SocketPath": "str", "Check": CHECK_SCHEMA, "Checks": ("list", CHECK_SCHEMA),
        "Weights": Schema("structs.Weights", {"Passing": "int", "Warning": "int"}),
        "Token": "str", "EnableTagOverride": "bool", "Proxy": PROXY_SCHEMA,
        "Connect": _CONNECT, "Locality": Schema("structs.Locality", {"Region": "str",
                                                                      "Zone": "str"}),
        "Namespace": "str", "Partition": "str",
    },
    {
        "enable_tag_override": "EnableTagOverride", "tagged_addresses": "TaggedAddresses",
        "socket_path": "SocketPath",
    },
)
