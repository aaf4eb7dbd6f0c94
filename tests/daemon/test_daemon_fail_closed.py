"""Authorization fails closed: a caller refused by the rules stays refused when the route table
is deleted from the registry or replaced by an empty one (the mesh's default_policy is deny).
Real daemons, registry and CA in-process; the callers present certificates the mesh CA issued."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import trio
from mesh_testing import Mesh, open_mesh, start_daemon, wait_for
from net_testing import free_port
from test_daemon import payments_app

from meshd.ca.operations import issue_to_directory
from meshd.identity.spiffe import Kind
from meshd.registry.config_store import ROUTES_KEY

TD = "test.mesh"
HOST_B = "127.0.20.5"
RULES = {"destinations": {"payments": {"authorization": {"rules": [
    {"name": "web-pays", "action": "allow", "from": ["web"]}]}}}}


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield await open_mesh(nursery, tmp_path, http, TD)


def _client(mesh: Mesh, service: str) -> httpx.AsyncClient:
    """An mTLS client holding ``service``'s certificate from the mesh CA (as a host would)."""
    out = mesh.tmp / "callers"
    issue_to_directory(mesh.ca_dir, Kind.SERVICE, service, out, now=datetime.now(UTC))
    ctx = ssl.create_default_context(cafile=str(out / "ca.crt"))
    ctx.check_hostname = False  # SPIFFE certificates name no host; the CA is the check
    ctx.load_cert_chain(out / f"{service}.crt", out / f"{service}.key")
    return httpx.AsyncClient(verify=ctx, timeout=5, trust_env=False)


async def test_deleting_or_emptying_the_table_never_lets_a_refused_caller_in(
        mesh: Mesh, nursery: trio.Nursery) -> None:
    app_port = free_port(HOST_B)
    await nursery.start(payments_app, HOST_B, app_port, "v1")
    await mesh.put_routes(RULES)
    conf = mesh.host_config("host-b", HOST_B, [{
        "name": "payments", "port": app_port, "address": HOST_B, "version": "v1",
        "health": {"none": True}}])
    await start_daemon(nursery, conf)
    url = f"https://{HOST_B}:{conf.inbound_port}/pay"
    sni = {"sni_hostname": "payments"}

    async with _client(mesh, "web") as web, _client(mesh, "evil") as evil:
        async def status(client: httpx.AsyncClient) -> int:
            return (await client.get(url, extensions=sni)).status_code

        async def rules_in_force() -> bool:
            return await status(web) == 200
        await wait_for(rules_in_force)
        assert await status(evil) == 403

        # an unauthenticated registry writer deletes the table: nothing opens
        r = await mesh.http.delete(f"{mesh.registry_url}/v1/kv/{ROUTES_KEY}")
        assert r.status_code == 200

        async def table_gone() -> bool:
            return await status(web) == 403  # default deny now covers payments
        await wait_for(table_gone)
        assert await status(evil) == 403

        # ... or writes an empty table: still nothing opens
        admin = f"http://{conf.admin_host}:{conf.admin_port}/v1/state"
        generation = (await mesh.http.get(admin)).json()["generation"]
        await mesh.put_routes({})

        async def applied() -> bool:
            return bool((await mesh.http.get(admin)).json()["generation"] > generation)
        await wait_for(applied)
        assert await status(evil) == 403
        assert await status(web) == 403

        # only an explicit default_policy = "allow" opens a service without rules
        await mesh.put_routes({"default_policy": "allow"})

        async def opened() -> bool:
            return await status(evil) == 200
        await wait_for(opened)
