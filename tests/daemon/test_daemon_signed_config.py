"""A control plane nobody can hijack: every meshd verifies the route table's signature before
applying it. A caller the rules refuse stays refused, and the table in force stays, when the
registry gets an unsigned table, one signed by an operator of another CA, a replay of an older
signed table, or one signed by a revoked operator certificate; ``/v1/state`` says why and who
signed the table in force, and ``meshd_config_refused_total`` counts the refusals by reason.
Real daemons, registry and CA in-process, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from mesh_testing import Mesh, open_mesh, start_daemon, wait_for
from operator_testing import issue_operator, signed_routes
from test_daemon_fail_closed import HOST_B, RULES, _client, _payments_host

from meshd.ca import operations
from meshd.ca.store import init_ca
from meshd.identity import keys

TD = "test.mesh"
# what an attacker wants in force: everyone may call payments
OPEN = {"default_policy": "allow", "destinations": {"payments": {}}}


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield await open_mesh(nursery, tmp_path, http, TD)


async def test_unsigned_foreign_replayed_or_revoked_tables_never_open_a_door(
        mesh: Mesh, nursery: trio.Nursery) -> None:
    # signed by the mesh's own operator, earlier than the rules: a later replay is stale
    replayed = signed_routes(OPEN, mesh.operator,
                             now=datetime.now(UTC) - timedelta(minutes=1))
    conf, _ = await _payments_host(mesh, nursery)
    admin = f"http://{conf.admin_host}:{conf.admin_port}"

    async def state() -> dict[str, Any]:
        return dict((await mesh.http.get(f"{admin}/v1/state")).json())

    async with _client(mesh, "web") as web, _client(mesh, "evil") as evil:
        async def evil_and_web() -> tuple[int, int]:
            """What payments answers evil (refused by the rules) and web (allowed)."""
            url = f"https://{HOST_B}:{conf.inbound_port}/pay"
            answers = [await c.get(url, extensions={"sni_hostname": "payments"})
                       for c in (evil, web)]
            return answers[0].status_code, answers[1].status_code

        async def rules_in_force() -> bool:
            return await evil_and_web() == (403, 200)
        await wait_for(rules_in_force)
        in_force = (await state())["routes_signed"]
        assert in_force["signer"] == "ops"
        assert in_force["signer_id"] == f"spiffe://{TD}/operator/ops"

        other_ca = mesh.tmp / "other-ca"
        init_ca(other_ca, TD, now=datetime.now(UTC) - timedelta(hours=1))
        stranger = issue_operator(other_ca, mesh.tmp / "stranger", "ops")
        mallory = issue_operator(mesh.ca_dir, mesh.tmp / "mallory", "mallory")
        mallory_serial = json.loads(signed_routes(OPEN, mallory))["certificates"][0]
        revoked = operations.revoke(mesh.ca_dir, now=datetime.now(UTC), who="test",
                                    serial=_serial(mallory_serial))
        assert len(revoked) == 1

        async def deny_list_has_mallory() -> bool:
            identity = (await state())["identity"]
            return bool(identity and identity["denylist"]["serials"] >= 1)
        await wait_for(deny_list_has_mallory)

        attempts = [
            ("unsigned", json.dumps(OPEN).encode(), "not signed"),
            ("unknown_signer", signed_routes(OPEN, stranger), "not issued by this mesh's CA"),
            ("replay", replayed, "not newer than version"),
            ("revoked", signed_routes(OPEN, mallory), "which the CA revoked"),
        ]
        for code, raw, reason in attempts:
            await mesh.put_routes(raw)

            async def refused(reason: str = reason) -> bool:
                return reason in (await state())["config_error"]
            await wait_for(refused)
            assert await evil_and_web() == (403, 200), code
            now = await state()
            assert now["routes_signed"] == in_force, code  # the table in force stays
            assert now["routes_source"] == "registry"
            assert now["routes"]["destinations"]["payments"]["authorization"]

        metrics = (await mesh.http.get(f"{admin}/metrics")).text
        for code, _, _ in attempts:
            assert f'meshd_config_refused_total{{reason="{code}"}} 1.0' in metrics, code

        # the operator signs a newer table: applied, and /v1/state names its version
        await mesh.put_routes(RULES)

        async def newer() -> bool:
            s = await state()
            return bool(s["config_error"] == "" and s["routes_signed"]["version"]
                        > in_force["version"])
        await wait_for(newer)
        assert await evil_and_web() == (403, 200)


def _serial(cert_pem: str) -> str:
    return keys.serial_hex(x509.load_pem_x509_certificate(cert_pem.encode()))


async def test_a_table_kept_on_disk_is_verified_again_at_start(
        mesh: Mesh, nursery: trio.Nursery) -> None:
    """What a meshd keeps in routes.json is the signed envelope; one altered on disk is not
    put in force at the next start (and the registry's signed table is)."""
    conf, daemon = await _payments_host(mesh, nursery)
    kept = conf.state_dir / "routes.json"
    envelope = json.loads(kept.read_bytes())
    assert envelope["format"] == "meshd-signed/1"
    await daemon.stop()

    envelope["signature"] = signed_envelope_signature_of(mesh)
    kept.write_text(json.dumps(envelope))
    await mesh.put_routes(b"{not json")
    await start_daemon(nursery, conf)
    state = (await mesh.http.get(
        f"http://{conf.admin_host}:{conf.admin_port}/v1/state")).json()
    assert state["routes_source"] == "none" and state["routes_signed"] is None
    assert "invalid JSON" in state["config_error"]


def signed_envelope_signature_of(mesh: Mesh) -> str:
    """A valid signature, but over another document: the envelope no longer verifies."""
    return str(json.loads(signed_routes(OPEN, mesh.operator))["signature"])


async def test_revoking_the_signer_of_the_table_in_force_drops_it(
        mesh: Mesh, nursery: trio.Nursery) -> None:
    """A table a (stolen) operator key signed is not kept once the CA revokes that certificate:
    every meshd drops it within a deny-list poll, here and on disk, and the default deny
    covers every service until a table signed with another certificate is applied. The
    dropped table stays the replay floor: an older signed table is still refused."""
    older = signed_routes(OPEN, mesh.operator, now=datetime.now(UTC) - timedelta(minutes=1))
    conf, _ = await _payments_host(mesh, nursery)
    admin = f"http://{conf.admin_host}:{conf.admin_port}/v1/state"
    mallory = issue_operator(mesh.ca_dir, mesh.tmp / "mallory", "mallory")
    async with _client(mesh, "web") as web, _client(mesh, "evil") as evil:
        url = f"https://{HOST_B}:{conf.inbound_port}/pay"

        async def answers() -> tuple[int, int]:
            got = [await c.get(url, extensions={"sni_hostname": "payments"})
                   for c in (evil, web)]
            return got[0].status_code, got[1].status_code

        await mesh.put_routes(signed_routes(OPEN, mallory))  # the door mallory opened

        async def opened() -> bool:
            return await answers() == (200, 200)
        await wait_for(opened)
        assert (conf.state_dir / "routes.json").exists()

        cert = x509.load_pem_x509_certificate(mallory.cert_pem)
        operations.revoke(mesh.ca_dir, now=datetime.now(UTC), who="test",
                          serial=keys.serial_hex(cert))

        async def closed() -> bool:
            return await answers() == (403, 403)
        await wait_for(closed, 15)  # the deny list is polled every ~2 s
        state = (await mesh.http.get(admin)).json()
        assert state["routes_signed"] is None and state["routes_source"] == "none"
        assert "which the CA revoked: the table is dropped" in state["config_error"]
        assert not (conf.state_dir / "routes.json").exists()

        await mesh.put_routes(older)  # a replay of an older signed table: still refused

        async def replay_refused() -> bool:
            return "replay" in (await mesh.http.get(admin)).json()["config_error"]
        await wait_for(replay_refused)
        assert await answers() == (403, 403)

        await mesh.put_routes(RULES)  # signed by the mesh's operator, newer: applies

        async def rules_again() -> bool:
            return await answers() == (403, 200)
        await wait_for(rules_again)
