"""The shapes ``?filter=`` selectors are checked against: one per kind of returned object, with
Consul's field names (docs/consul-api.md §4.3, §5.6, §6, §7)."""

from __future__ import annotations

from meshd.registry.embedded.filter import FieldType, FilterSchema

S, INT, B, ANY = "str", "int", "bool", "any"
STR_MAP: FieldType = ("map", S)
STR_LIST: FieldType = ("list", S)

_WEIGHTS: FilterSchema = {"Passing": INT, "Warning": INT}
_SERVICE_ADDRESS: FilterSchema = {"Address": S, "Port": INT}
_LOCALITY: FilterSchema = {"Region": S, "Zone": S}
_MESH_GATEWAY: FilterSchema = {"Mode": S}
_UPSTREAM: FilterSchema = {
    "DestinationType": S, "DestinationNamespace": S, "DestinationPartition": S,
    "DestinationPeer": S, "DestinationName": S, "Datacenter": S, "LocalBindAddress": S,
    "LocalBindPort": INT, "LocalBindSocketPath": S, "LocalBindSocketMode": S, "Config": ANY,
    "MeshGateway": _MESH_GATEWAY, "CentrallyConfigured": B,
}
_EXPOSE: FilterSchema = {
    "Checks": B,
    "Paths": ("list", {"ListenerPort": INT, "Path": S, "LocalPathPort": INT, "Protocol": S}),
}
PROXY: FilterSchema = {
    "DestinationServiceName": S, "DestinationServiceID": S, "LocalServiceAddress": S,
    "LocalServicePort": INT, "LocalServiceSocketPath": S, "Mode": S,
    "TransparentProxy": {"OutboundListenerPort": INT, "DialedDirectly": B}, "Config": ANY,
    "Upstreams": ("list", _UPSTREAM), "MeshGateway": _MESH_GATEWAY, "Expose": _EXPOSE,
}
_CONNECT: FilterSchema = {"Native": B, "SidecarService": ANY}

AGENT_SERVICE: FilterSchema = {
    "Kind": S, "ID": S, "Service": S, "Tags": STR_LIST, "Meta": STR_MAP, "Port": INT,
    "Address": S, "SocketPath": S, "TaggedAddresses": ("map", _SERVICE_ADDRESS),
    "Weights": _WEIGHTS, "EnableTagOverride": B, "Proxy": PROXY, "Connect": _CONNECT,
    "Locality": _LOCALITY, "Datacenter": S, "Namespace": S, "Partition": S, "PeerName": S,
    "CreateIndex": INT, "ModifyIndex": INT,
}
NODE_SERVICE: FilterSchema = {k: v for k, v in AGENT_SERVICE.items() if k != "Datacenter"}

HEALTH_CHECK: FilterSchema = {
    "Node": S, "CheckID": S, "Name": S, "Status": S, "Notes": S, "Output": S, "ServiceID": S,
    "ServiceName": S, "ServiceTags": STR_LIST, "Type": S, "Interval": S, "Timeout": S,
    "ExposedPort": INT, "Definition": ANY, "Namespace": S, "Partition": S, "PeerName": S,
    "CreateIndex": INT, "ModifyIndex": INT,
}

NODE: FilterSchema = {
    "ID": S, "Node": S, "Address": S, "Datacenter": S, "TaggedAddresses": STR_MAP,
    "Meta": STR_MAP, "Partition": S, "PeerName": S, "Locality": _LOCALITY, "CreateIndex": INT,
    "ModifyIndex": INT,
}

CATALOG_SERVICE: FilterSchema = {
    "ID": S, "Node": S, "Address": S, "Datacenter": S, "TaggedAddresses": STR_MAP,
    "NodeMeta": STR_MAP, "ServiceKind": S, "ServiceID": S, "ServiceName": S,
    "ServiceTags": STR_LIST, "ServiceAddress": S,
    "ServiceTaggedAddresses": ("map", _SERVICE_ADDRESS), "ServiceWeights": _WEIGHTS,
    "ServiceMeta": STR_MAP, "ServicePort": INT, "ServiceSocketPath": S,
    "ServiceEnableTagOverride": B, "ServiceProxy": PROXY, "ServiceConnect": _CONNECT,
    "ServiceLocality": _LOCALITY, "Namespace": S, "Partition": S, "PeerName": S,
    "CreateIndex": INT, "ModifyIndex": INT,
}

HEALTH_ENTRY: FilterSchema = {
    "Node": NODE, "Service": NODE_SERVICE, "Checks": ("list", HEALTH_CHECK),
}
