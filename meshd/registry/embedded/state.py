"""The embedded registry's state: one own node, other nodes from the catalog, services, checks,
sessions and KV, with Consul's indexes.

Pure code, no I/O and no trio. Every write is two steps, so the shell can make it durable before
anyone sees it:

1. ``plan_*`` validates the request against the current state and returns a ``Mutation`` (the
   index it will be written at and the record puts/deletes), raising ``ApiError`` on refusal;
2. ``apply(mutation, now)`` changes memory and returns a ``Wake``: the topics whose blocking
   watchers must re-run their query.

Replaying the logged ops of the same mutations (``apply`` with ``now=None``) rebuilds the same
state, indexes included. The tables and ``apply`` live in ``store.core``; the plans are grouped by
concern in the ``store`` mixins this class combines.
"""

from __future__ import annotations

from dataclasses import replace

from meshd.registry.embedded.store.acl import AclWrites
from meshd.registry.embedded.store.catalog import CatalogWrites
from meshd.registry.embedded.store.core import REAP_MINIMUM, Wake, same
from meshd.registry.embedded.store.records import PASSING, Check, Mutation, Node, Op, Service
from meshd.registry.embedded.store.sessions import SERF_CHECK_ID, SessionWrites

CONSUL_VERSION = "1.22.0"
SERVER_RPC_PORT = 8300

__all__ = ["CONSUL_VERSION", "REAP_MINIMUM", "SERF_CHECK_ID", "SERVER_RPC_PORT",
           "RegistryState", "Wake"]


class RegistryState(CatalogWrites, SessionWrites, AclWrites):
    # --- standing state (docs/consul-api.md §3) ---------------------------------------------------

    def plan_boot(self, *, node_name: str, node_id: str, address: str, datacenter: str) -> Mutation:
        """Make sure the own node, its serfHealth check and the `consul` service are as
        configured (a renamed node replaces the old own node record)."""
        index = self.index + 1
        node = Node(
            id=node_id, name=node_name, address=address, datacenter=datacenter,
            tagged_addresses={"lan": address, "lan_ipv4": address, "wan": address,
                              "wan_ipv4": address},
            meta={"consul-network-segment": "", "consul-version": CONSUL_VERSION},
        )
        serf = Check(
            id=SERF_CHECK_ID, name="Serf Health Status", status=PASSING,
            output="Agent alive and reachable", agent=False,
        )
        consul = Service(
            id="consul", name="consul", port=SERVER_RPC_PORT, agent=False,
            meta={"version": CONSUL_VERSION, "raft_version": "3", "non_voter": "false",
                  "read_replica": "false", "serf_protocol_current": "2",
                  "serf_protocol_max": "5", "serf_protocol_min": "1", "grpc_port": "8502"},
        )
        ops = [Op("node", n.name, None) for n in self.nodes.values()
               if n.agent and n.name != node_name]
        for table, key, new, old in (
            ("node", node_name, node, self.nodes.get(node_name)),
            ("service", "consul", consul, self.services.get("consul")),
            ("check", SERF_CHECK_ID, serf, self.checks.get(SERF_CHECK_ID)),
        ):
            if old is None or not same(old, new):
                created = old.create_index if old is not None else index
                ops.append(Op(table, key,  # type: ignore[arg-type]
                              replace(new, create_index=created, modify_index=index)))
        return Mutation(index=index if ops else 0, ops=tuple(ops))

    # --- KV writes (the KV table plans, this assigns the index) ----------------------------------

    def plan_kv_put(self, key: str, value: bytes, *, flags: int, cas: int | None) -> Mutation:
        return self.kv.plan_put(key, value, flags=flags, cas=cas, index=self.index + 1)

    def plan_kv_delete(self, key: str, *, recurse: bool, cas: int | None) -> Mutation:
        return self.kv.plan_delete(key, recurse=recurse, cas=cas, index=self.index + 1)
