"""Authorization fails closed: a caller refused by the rules stays refused when the route table
is deleted from the registry or replaced by an empty or invalid one (the meshd keeps the table in
force, on disk too, and says why; with no table at all, the default_policy deny applies).
Real daemons, registry and CA in-process; the callers present certificates the mesh CA issued."""

from __future__ import annotations

import json
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
from meshd.config.schema import HostConfig
from meshd.daemon.lifetime import Daemon
from meshd.identity.signing import inspect
from meshd.identity.spiffe import Kind
from meshd.registry.config_store import ROUTES_KEY, RouteConfigStore
from meshd.registry.consul import ConsulClient

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


async def _payments_host(mesh: Mesh, nursery: trio.Nursery) -> tuple[HostConfig, Daemon]:
    """host-b running payments v1 under ``RULES`` (only web may call it)."""
    app_port = free_port(HOST_B)
    await nursery.start(payments_app, HOST_B, app_port, "v1")
    await mesh.put_routes(RULES)
    conf = mesh.host_config("host-b", HOST_B, [{
        "name": "payments", "port": app_port, "address": HOST_B, "version": "v1",
        "health": {"none": True}}])
    return conf, await start_daemon(nursery, conf)


async def test_deleting_or_emptying_the_table_never_lets_a_refused_caller_in(
        mesh: Mesh, nursery: trio.Nursery) -> None:
    conf, _ = await _payments_host(mesh, nursery)
    url = f"https://{HOST_B}:{conf.inbound_port}/pay"
    sni = {"sni_hostname": "payments"}

    async with _client(mesh, "web") as web, _client(mesh, "evil") as evil:
        async def status(client: httpx.AsyncClient) -> int:
            return (await client.get(url, extensions=sni)).status_code

        async def rules_in_force() -> bool:
            return await status(web) == 200
        await wait_for(rules_in_force)
        assert await status(evil) == 403

        admin = f"http://{conf.admin_host}:{conf.admin_port}/v1/state"

        async def refused(reason: str) -> bool:
            return reason in (await mesh.http.get(admin)).json()["config_error"]

        # a registry writer deletes the table, or writes an empty one: the meshd keeps the
        # table in force and says why; nothing opens and nothing is lost
        r = await mesh.http.delete(f"{mesh.registry_url}/v1/kv/{ROUTES_KEY}")
        assert r.status_code == 200
        await wait_for(lambda: refused("is missing from the registry"))
        assert (await status(evil), await status(web)) == (403, 200)
        for empty in ({}, {"destinations": {}}, {"default_policy": "allow"}):
            await mesh.put_routes(empty)
            await wait_for(lambda: refused("holds a table without destinations"))
            assert (await status(evil), await status(web)) == (403, 200)
        state = (await mesh.http.get(admin)).json()
        assert state["routes_source"] == "registry"
        assert state["routes"]["destinations"]["payments"]["authorization"]

        # an operator empties it on purpose: applied, and the default deny covers payments
        async with ConsulClient(mesh.registry_url) as consul:
            await RouteConfigStore(consul, signer=mesh.operator).clear()

        async def cleared() -> bool:
            return await status(web) == 403
        await wait_for(cleared)
        assert await status(evil) == 403
        assert (await mesh.http.get(admin)).json()["config_error"] == ""

        # only an explicit default_policy = "allow" opens a service without rules
        await mesh.put_routes({"default_policy": "allow", "clear": True})

        async def opened() -> bool:
            return await status(evil) == 200
        await wait_for(opened)


async def test_a_restart_starts_with_the_last_good_table_from_disk(
        mesh: Mesh, nursery: trio.Nursery) -> None:
    """The table a meshd applied is kept in its state directory and put in force at the next
    start, before the registry answers; the registry's answer then replaces it."""
    conf, daemon = await _payments_host(mesh, nursery)
    kept = conf.state_dir / "routes.json"
    assert inspect(json.loads(kept.read_bytes()), "routes").data["destinations"]["payments"][
        "authorization"]
    assert kept.stat().st_mode & 0o777 == 0o600
    await daemon.stop()

    # the registry now holds garbage: the restarted meshd serves with the table from disk
    await mesh.put_routes(b"{not json")
    async with _client(mesh, "web") as web, _client(mesh, "evil") as evil:
        await start_daemon(nursery, conf)
        url = f"https://{HOST_B}:{conf.inbound_port}/pay"
        sni = {"sni_hostname": "payments"}
        assert (await web.get(url, extensions=sni)).status_code == 200
        assert (await evil.get(url, extensions=sni)).status_code == 403
        state = (await mesh.http.get(
            f"http://{conf.admin_host}:{conf.admin_port}/v1/state")).json()
        assert state["routes_source"] == "disk"
        assert "invalid JSON" in state["config_error"]
