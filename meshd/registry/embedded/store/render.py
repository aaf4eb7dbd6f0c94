"""Records to the JSON shapes of the Consul HTTP API (docs/consul-api.md §3-§8, §10).

Pure functions. Key sets matter more than key order: clients (py-consul's tests among them)
assert exact key sets, e.g. a plain agent service has exactly nine keys.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from meshd.registry.embedded.state import CONSUL_VERSION, SERVER_RPC_PORT, RegistryState
from meshd.registry.embedded.store.agent import PROXY_KINDS
from meshd.registry.embedded.store.decode import format_duration
from meshd.registry.embedded.store.records import Check, KVEntry, Node, Service

SERF_LAN_PORT = 8301


def weights_json(service: Service) -> dict[str, int]:
    return {"Passing": service.weights[0], "Warning": service.weights[1]}


def proxy_json(proxy: dict[str, Any] | None) -> dict[str, Any]:
    """Go's ConnectProxyConfig: zero fields omitted except Mode, MeshGateway and Expose."""
    p = proxy or {}
    out: dict[str, Any] = {}
    for key in ("DestinationServiceName", "DestinationServiceID", "LocalServiceAddress",
                "LocalServicePort", "LocalServiceSocketPath"):
        if p.get(key):
            out[key] = p[key]
    out["Mode"] = p.get("Mode", "")
    for key in ("TransparentProxy", "Config", "Upstreams"):
        if p.get(key):
            out[key] = p[key]
    out["MeshGateway"] = p.get("MeshGateway", {})
    out["Expose"] = p.get("Expose", {})
    return out


def agent_service_json(service: Service, datacenter: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if service.kind:
        out["Kind"] = service.kind
    out.update(ID=service.id, Service=service.name, Tags=list(service.tags),
               Meta=dict(service.meta), Port=service.port, Address=service.address)
    if service.socket_path:
        out["SocketPath"] = service.socket_path
    if service.tagged_addresses:
        out["TaggedAddresses"] = service.tagged_addresses
    out["Weights"] = weights_json(service)
    out["EnableTagOverride"] = service.enable_tag_override
    if service.kind in PROXY_KINDS:
        out["Proxy"] = proxy_json(service.proxy)
    if service.connect:
        out["Connect"] = service.connect
    if service.locality:
        out["Locality"] = service.locality
    out["Datacenter"] = datacenter
    return out


def content_hash(service_json: dict[str, Any]) -> str:
    raw = json.dumps(service_json, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def node_json(node: Node) -> dict[str, Any]:
    return {
        "ID": node.id, "Node": node.name, "Address": node.address,
        "Datacenter": node.datacenter, "TaggedAddresses": dict(node.tagged_addresses),
        "Meta": dict(node.meta), "CreateIndex": node.create_index,
        "ModifyIndex": node.modify_index,
    }


def node_service_json(service: Service, *, health: bool) -> dict[str, Any]:
    """The unflattened NodeService of catalog/node and health/service."""
    out: dict[str, Any] = {}
    if service.kind:
        out["Kind"] = service.kind
    out.update(ID=service.id, Service=service.name, Tags=list(service.tags),
               Address=service.address)
    if service.tagged_addresses:
        out["TaggedAddresses"] = service.tagged_addresses
    # Consul leaves an unset Meta nil here; only agent/services normalises it to {}.
    out["Meta"] = dict(service.meta) if service.meta or not health else None
    out["Port"] = service.port
    if service.socket_path:
        out["SocketPath"] = service.socket_path
    out.update(Weights=weights_json(service), EnableTagOverride=service.enable_tag_override,
               Proxy=proxy_json(service.proxy), Connect=service.connect or {})
    if service.locality:
        out["Locality"] = service.locality
    out.update(CreateIndex=service.create_index, ModifyIndex=service.modify_index)
    return out


def catalog_service_json(node: Node, service: Service) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ID": node.id, "Node": node.name, "Address": node.address,
        "Datacenter": node.datacenter, "TaggedAddresses": dict(node.tagged_addresses),
        "NodeMeta": dict(node.meta), "ServiceKind": service.kind, "ServiceID": service.id,
        "ServiceName": service.name, "ServiceTags": list(service.tags),
        "ServiceAddress": service.address,
    }
    if service.tagged_addresses:
        out["ServiceTaggedAddresses"] = service.tagged_addresses
    out.update(ServiceWeights=weights_json(service), ServiceMeta=dict(service.meta),
               ServicePort=service.port)
    if service.socket_path:
        out["ServiceSocketPath"] = service.socket_path
    out.update(ServiceEnableTagOverride=service.enable_tag_override,
               ServiceProxy=proxy_json(service.proxy), ServiceConnect=service.connect or {})
    if service.locality:
        out["ServiceLocality"] = service.locality
    out.update(CreateIndex=service.create_index, ModifyIndex=service.modify_index)
    return out


def check_json(state: RegistryState, check: Check, *, agent_view: bool = False) -> dict[str, Any]:
    owner = state.owner(check)
    definition = dict(check.definition)
    return {
        "Node": state.node_name(check.node),
        "CheckID": check.id, "Name": check.name, "Status": check.status, "Notes": check.notes,
        "Output": check.output, "ServiceID": check.service_id,
        "ServiceName": owner.name if owner else "",
        "ServiceTags": list(owner.tags) if owner else [],
        "Type": check.type, "Interval": format_duration(check.interval),
        "Timeout": format_duration(check.timeout), "ExposedPort": 0, "Definition": definition,
        "CreateIndex": 0 if agent_view else check.create_index,
        "ModifyIndex": 0 if agent_view else check.modify_index,
    }


def health_entry_json(state: RegistryState, service: Service) -> dict[str, Any]:
    checks = state.node_checks(service.node) + state.checks_of(service.key)
    svc = node_service_json(service, health=True)
    return {
        "Node": node_json(state.node_record(service.node)),
        "Service": svc,
        "Checks": [check_json(state, c) for c in checks],
    }


def kv_entry_json(entry: KVEntry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "LockIndex": entry.lock_index, "Key": entry.key, "Flags": entry.flags,
        "Value": base64.b64encode(entry.value).decode("ascii") if entry.value else None,
    }
    if entry.session:
        out["Session"] = entry.session
    out.update(CreateIndex=entry.create_index, ModifyIndex=entry.modify_index)
    return out


def leader_address(node: Node) -> str:
    host = f"[{node.address}]" if ":" in node.address else node.address
    return f"{host}:{SERVER_RPC_PORT}"


def member_json(node: Node, *, acls: bool = False) -> dict[str, Any]:
    return {
        "Name": node.name, "Addr": node.address, "Port": SERF_LAN_PORT,
        "Tags": {
            "acls": "1" if acls else "0", "build": CONSUL_VERSION, "dc": node.datacenter,
            "id": node.id,
            "port": str(SERVER_RPC_PORT), "role": "consul", "segment": "", "vsn": "2",
            "vsn_max": "3", "vsn_min": "2",
        },
        "Status": 1, "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
        "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
    }


def agent_self_json(state: RegistryState, *, acls: bool = False) -> dict[str, Any]:
    node = state.node_record("")
    services = sum(s.agent for s in state.services.values())
    checks = [c for c in state.checks.values() if c.agent]
    return {
        "Config": {
            "Datacenter": node.datacenter, "PrimaryDatacenter": node.datacenter,
            "NodeName": node.name, "NodeID": node.id, "Revision": "meshd",
            "Server": True, "Version": CONSUL_VERSION, "BuildDate": "1970-01-01T00:00:00Z",
        },
        "DebugConfig": {},
        "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
        "Member": member_json(node, acls=acls),
        "Stats": {
            "consul": {"leader": "true", "leader_addr": leader_address(node), "server": "true",
                       "known_datacenters": "1", "bootstrap": "true"},
            "agent": {"check_monitors": "0",
                      "check_ttls": str(sum(c.type == "ttl" for c in checks)),
                      "services": str(services), "checks": str(len(checks))},
        },
        "Meta": dict(node.meta),
        "xDS": {"SupportedProxies": {}, "Port": -1, "Ports": {"Plaintext": -1, "TLS": -1}},
    }
