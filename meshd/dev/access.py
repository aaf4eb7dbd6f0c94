"""Who may do what in a ``meshd up`` mesh: the registry runs with ACLs on (default deny) and a
random management secret that only this runner holds, for the set-up below, and that no meshd
ever sees. With it the runner creates one policy and token per simulated host (that host's own
services, read the rest: ``meshd.registry.acl_policies``) and one operator token (write the mesh
config). Each token goes into a 0600 file: a host's next to its meshd.toml, the operator's in the
run dir, named by the operator context. The operator also gets a certificate from the mesh CA.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import trio

from meshd.ca.operations import issue_to_directory
from meshd.config.mesh_schema import MeshConfig
from meshd.errors import MeshError
from meshd.fileio import write_atomic
from meshd.identity.spiffe import Kind
from meshd.operator_context import OperatorCredentials
from meshd.registry.acl_policies import (
    OPERATOR_POLICY,
    host_policy_name,
    host_rules,
    operator_rules,
)
from meshd.registry.consul import ConsulClient

MANAGEMENT_ENV = "MESHD_REGISTRY_ACL_INITIAL_MANAGEMENT"
OPERATOR_NAME = "dev"
TOKEN_FILE = "registry-token"


def registry_acl_args() -> tuple[str, ...]:
    """``meshd registry serve`` flags of a mesh with ACLs on. The management secret goes in the
    child's environment (``MANAGEMENT_ENV``), not its argv, which every local user can read."""
    return ("--acl-enabled", "--acl-default-policy", "deny")


def new_secret() -> str:
    return str(uuid.uuid4())   # Consul's secrets are UUIDs (122 random bits)


@dataclass(frozen=True)
class MeshTokens:
    hosts: Mapping[str, str]   # node -> its meshd's SecretID
    operator: str


async def create_tokens(registry: str, management: str, mesh: MeshConfig) -> MeshTokens:
    """Create the operator's and every host's policy and token with the management token."""
    async with ConsulClient(registry, token=management) as admin:
        await admin.acl_create_policy(OPERATOR_POLICY, operator_rules(),
                                      "meshd operator: writes the mesh config")
        operator = await admin.acl_create_token("meshd up: operator", [OPERATOR_POLICY])
        hosts: dict[str, str] = {}
        for host in mesh.hosts:
            policy = host_policy_name(host.name)
            await admin.acl_create_policy(
                policy, host_rules([*(ms.service.name for ms in host.services),
                                    *(g.name for g in host.gateways)]),
                f"meshd on {host.name}: registers its own services, reads the mesh")
            hosts[host.name] = await admin.acl_create_token(f"meshd up: meshd on {host.name}",
                                                            [policy])
    return MeshTokens(hosts, operator)


def write_secret(path: Path, secret: str) -> None:
    """A secret alone in a file, mode 0600 from the start."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, (secret + "\n").encode(), 0o600)
    except OSError as exc:
        raise MeshError(f"cannot write {path}: {exc.strerror or exc}") from exc


async def issue_operator_certificate(ca_dir: Path, out: Path) -> OperatorCredentials:
    """``meshd ca issue --operator dev`` into ``out`` (key generation: in a worker thread)."""
    issued = await trio.to_thread.run_sync(
        lambda: issue_to_directory(ca_dir, Kind.OPERATOR, OPERATOR_NAME, out,
                                   now=datetime.now(UTC)))
    return OperatorCredentials(OPERATOR_NAME, issued.cert, issued.key, issued.ca_bundle)
