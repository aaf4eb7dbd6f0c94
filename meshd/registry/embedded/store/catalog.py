"""Low-level catalog writes: ``PUT /v1/catalog/register`` and ``/v1/catalog/deregister``
(docs/consul-api.md §6). They add other nodes, their services and checks (py-consul's catalog tests
create extra nodes this way). Pure.

Divergences, on purpose: the registry's own node record is not changed by a catalog write (it is
the standing state of §3), and records the agent owns on its own node are left alone by a catalog
deregister (Consul's anti-entropy would put them back within seconds anyway).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from meshd.registry.embedded.store.agent import service_from_definition
from meshd.registry.embedded.store.agent_writes import AgentWrites
from meshd.registry.embedded.store.core import same
from meshd.registry.embedded.store.decode import PROXY_SCHEMA, FieldType, Schema, parse_duration
from meshd.registry.embedded.store.records import (
    CHECK_STATUSES,
    CRITICAL,
    ApiError,
    Check,
    Mutation,
    Node,
    Op,
    record_key,
)

_ADDRESS = Schema("structs.ServiceAddress", {"Address": "str", "Port": "int"})
CATALOG_SERVICE_SCHEMA = Schema(
    "structs.NodeService",
    {
        "Kind": "str", "ID": "str", "Service": "str", "Tags": ("list", "str"),
        "Address": "str", "TaggedAddresses": ("map", _ADDRESS), "Meta": ("map", "str"),
        "Port": "int", "SocketPath": "str",
        "Weights": Schema("structs.Weights", {"Passing": "int", "Warning": "int"}),
        "EnableTagOverride": "bool", "Proxy": PROXY_SCHEMA,
        "Connect": Schema("structs.ServiceConnect", {"Native": "bool"}),
        "Locality": Schema("structs.Locality", {"Region": "str", "Zone": "str"}),
        "Namespace": "str", "Partition": "str", "PeerName": "str", "Datacenter": "str",
        "ContentHash": "str", "CreateIndex": "int", "ModifyIndex": "int",
    },
)
_CHECK_DEFINITION: dict[str, FieldType] = {
    "HTTP": "str", "TLSServerName": "str", "TLSSkipVerify": "bool",
    "Header": ("map", ("list", "str")), "Method": "str", "Body": "str", "TCP": "str",
    "UDP": "str", "GRPC": "str", "GRPCUseTLS": "bool", "Interval": "str", "Timeout": "str",
    "DeregisterCriticalServiceAfter": "str", "OSService": "str", "H2PING": "str",
}
CATALOG_CHECK_SCHEMA = Schema(
    "structs.HealthCheck",
    {
        "Node": "str", "CheckID": "str", "Name": "str", "Status": "str", "Notes": "str",
        "Output": "str", "ServiceID": "str", "ServiceName": "str",
        "ServiceTags": ("list", "str"), "Type": "str", "Interval": "str", "Timeout": "str",
        "ExposedPort": "int",
        "Definition": Schema("structs.HealthCheckDefinition", _CHECK_DEFINITION),
        "Namespace": "str", "Partition": "str", "PeerName": "str", "CreateIndex": "int",
        "ModifyIndex": "int",
    },
)
REGISTER_SCHEMA = Schema(
    "structs.RegisterRequest",
    {
        "Datacenter": "str", "ID": "str", "Node": "str", "Address": "str",
        "TaggedAddresses": ("map", "str"), "NodeMeta": ("map", "str"),
        "Service": CATALOG_SERVICE_SCHEMA, "Check": CATALOG_CHECK_SCHEMA,
        "Checks": ("list", CATALOG_CHECK_SCHEMA), "SkipNodeUpdate": "bool", "Token": "str",
        "Namespace": "str", "Partition": "str", "PeerName": "str",
        "Locality": Schema("structs.Locality", {"Region": "str", "Zone": "str"}),
        # promoted from embedded structs; py-consul sends {"WriteRequest": {"Token": ...}}
        "WriteRequest": "any", "CreateIndex": "int", "ModifyIndex": "int",
    },
)
DEREGISTER_SCHEMA = Schema(
    "structs.DeregisterRequest",
    {
        "Datacenter": "str", "Node": "str", "ServiceID": "str", "CheckID": "str",
        "Token": "str", "Namespace": "str", "Partition": "str", "PeerName": "str",
        "WriteRequest": "any",
    },
)
_IGNORED_SERVICE_FIELDS = ("Namespace", "Partition", "PeerName", "Datacenter", "ContentHash",
                           "CreateIndex", "ModifyIndex")


class CatalogWrites(AgentWrites):
    def plan_catalog_register(self, request: Mapping[str, Any]) -> Mutation:
        name = request.get("Node", "")
        if not name:
            raise ApiError(500, "Must provide node")
        if not request.get("Address") and not request.get("SkipNodeUpdate"):
            raise ApiError(500, "Must provide address if SkipNodeUpdate is not set")
        node_id = request.get("ID", "")
        if node_id:
            try:
                uuid.UUID(node_id)
            except ValueError:
                raise ApiError(500, f"Bad node ID: uuid string is wrong length: {node_id}"
                               ) from None
        index = self.index + 1
        ops: list[Op] = []
        node = self.node_key(name)
        if node is None or (node and not request.get("SkipNodeUpdate")):
            ops.extend(self._node_op(name, request, index))  # (the own node is never changed)
            node = name
        service_key = ""
        if "Service" in request:
            service_op = self._service_op(node, request["Service"], index)
            service_key = service_op.key
            if service_op.value is not None:
                ops.append(service_op)
        checks = ([request["Check"]] if "Check" in request else []) + list(
            request.get("Checks", ()))
        for defn in checks:
            op = self._check_op(node, name, defn, index, service_key)
            if op is not None:
                ops.append(op)
        return self.mutation(index, ops, result=True)

    def _node_op(self, name: str, request: Mapping[str, Any], index: int) -> list[Op]:
        old = self.nodes.get(name)
        new = Node(
            id=request.get("ID", ""), name=name, address=request.get("Address", ""),
            datacenter=old.datacenter if old else (self.node.datacenter if self.node else ""),
            tagged_addresses=dict(request.get("TaggedAddresses", {})),
            meta=dict(request.get("NodeMeta", {})), agent=False,
            create_index=old.create_index if old else index, modify_index=index,
        )
        return [] if old is not None and same(old, new) else [Op("node", name, new)]

    def _service_op(self, node: str, defn: Mapping[str, Any], index: int) -> Op:
        """The op registering the service; its value is None when nothing changes."""
        if not defn.get("Service"):
            raise ApiError(500, "Must provide service name (Service.Service) in the "
                                "registration request")
        agent_def = {k: v for k, v in defn.items()
                     if k not in ("Service", *_IGNORED_SERVICE_FIELDS)}
        agent_def["Name"] = defn["Service"]
        try:
            service, _ = service_from_definition(agent_def)
        except ApiError as exc:
            raise ApiError(500, exc.text) from exc
        key = record_key(node, service.id)
        old = self.services.get(key)
        if old is not None and (old.agent or _standing(node, old.id)):
            return Op("service", key, None)  # the agent's own records stay the agent's
        new = replace(service, node=node, agent=False,
                      create_index=old.create_index if old else index, modify_index=index)
        return Op("service", key, None if old is not None and same(old, new) else new)

    def _check_op(self, node: str, node_name: str, defn: Mapping[str, Any], index: int,
                  service_key: str) -> Op | None:
        if defn.get("Node") and defn["Node"] != node_name:
            raise ApiError(500, "Node in check doesn't match node in register request")
        check_id = defn.get("CheckID") or defn.get("Name", "")
        if not check_id:
            raise ApiError(500, "Missing check ID")
        status = defn.get("Status") or CRITICAL
        if status not in CHECK_STATUSES:
            raise ApiError(500, f"Invalid check status: '{status}'")
        service_id = defn.get("ServiceID", "")
        if service_id:
            skey = record_key(node, service_id)
            if skey not in self.services and skey != service_key:
                raise ApiError(500, "Missing service registration")
        definition = dict(defn.get("Definition", {}))
        interval = timeout = 0.0
        if definition.get("Interval"):
            interval = parse_duration(definition["Interval"])
        if definition.get("Timeout"):
            timeout = parse_duration(definition["Timeout"])
        key = record_key(node, check_id)
        old = self.checks.get(key)
        if old is not None and old.agent:
            return None
        new = Check(
            id=check_id, name=defn.get("Name") or check_id, status=status,
            notes=defn.get("Notes", ""), output=defn.get("Output", ""), service_id=service_id,
            type=defn.get("Type", ""), interval=interval, timeout=timeout,
            definition=definition, agent=False, node=node,
            create_index=old.create_index if old else index, modify_index=index,
        )
        return None if old is not None and same(old, new) else Op("check", key, new)

    def plan_catalog_deregister(self, request: Mapping[str, Any]) -> Mutation:
        name = request.get("Node", "")
        if not name:
            raise ApiError(500, "Must provide node")
        node = self.node_key(name)
        index = self.index + 1
        if node is None:
            return Mutation(result=True)
        ops: list[Op] = []
        if request.get("ServiceID"):
            service = self.services.get(record_key(node, request["ServiceID"]))
            if service is not None and not service.agent and not _standing(node, service.id):
                ops.extend(self.remove_services_ops([service.key]))
        elif request.get("CheckID"):
            check = self.checks.get(record_key(node, request["CheckID"]))
            if check is not None and not check.agent and not _standing(node, check.id):
                ops.append(Op("check", check.key, None))
        else:
            if not node:
                raise ApiError(500, "the registry's own node cannot be deregistered")
            ops.extend(self.remove_services_ops(s.key for s in self.node_services(node)))
            ops.extend(Op("check", c.key, None) for c in self.node_checks(node))
            ops.append(Op("node", name, None))
        return self.mutation(index, ops, result=True)


def _standing(node: str, ident: str) -> bool:
    """The own node's standing records (docs/consul-api.md §3)
    stay whatever a catalog write says."""
    return not node and ident in ("consul", "serfHealth")
