"""The registry ACL policies of a mesh, as Consul rules (HCL): what a meshd host's token may do,
and what an operator's may. Pure; ``meshd up`` creates them, docs/vm-install.md shows them by hand.

A meshd registers each local service and its ``connect-proxy`` entry through the agent API, with
a TTL check each, and updates and removes them: ``service:write`` on those two names is all that
needs (the entries live on the registry agent's node, so no ``node:write``; a check of a service
is the service's). It watches its upstreams (``health/connect``: ``service:read`` and
``node:read``, since instances are only visible with both) and reads the mesh config under
``meshd/config/``. The operator writes the mesh config and reads the catalog (the console).
"""

from __future__ import annotations

from collections.abc import Iterable

from meshd.registry.registration import proxy_service_name

CONFIG_PREFIX = "meshd/config/"
OPERATOR_POLICY = "meshd-operator"

_READ_THE_MESH = (
    'service_prefix "" { policy = "read" }\n'
    'node_prefix "" { policy = "read" }\n'
)


def host_policy_name(node: str) -> str:
    return f"meshd-host-{node}"


def host_rules(services: Iterable[str]) -> str:
    """The rules of a meshd host running ``services``: write its own entries, read the rest."""
    own = "".join(f'service "{name}" {{ policy = "write" }}\n'
                  f'service "{proxy_service_name(name)}" {{ policy = "write" }}\n'
                  for name in services)
    return own + _READ_THE_MESH + f'key_prefix "{CONFIG_PREFIX}" {{ policy = "read" }}\n'


def operator_rules() -> str:
    """The rules of an operator (``meshd routes``, ``meshd tui``): write the mesh config."""
    return f'key_prefix "{CONFIG_PREFIX}" {{ policy = "write" }}\n' + _READ_THE_MESH
