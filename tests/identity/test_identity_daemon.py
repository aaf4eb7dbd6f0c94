"""Renewal inside real daemons: two hosts keep serving through renewals (certificates of six
seconds), and a restarted host renews with its node certificate though its token is spent."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import trio
from daemon_testing import TD, DaemonMesh, app, open_mesh, single_route, start_daemon, wait_for
from net_testing import free_port

from meshd.ca import audit

HOST_A, HOST_B = "127.0.21.2", "127.0.21.3"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def payments(port: int) -> list[dict[str, object]]:
    return [{"name": "payments", "port": port, "address": HOST_B, "version": "v1",
             "health": {"http": "/healthz", "interval": "200ms"}}]


async def test_two_hosts_keep_serving_across_renewals(
    nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    mesh = await open_mesh(nursery, tmp_path, http, leaf_lifetime=timedelta(seconds=6))
    app_port = free_port(HOST_B)
    await nursery.start(app, HOST_B, app_port, "payments")
    await mesh.put_routes(single_route("payments", "v1"))
    upstream = free_port("127.0.0.1")
    host_b = await start_daemon(nursery, mesh.host_config("host-b", HOST_B, payments(app_port)))
    a_conf = mesh.host_config("host-a", HOST_A, [{
        "name": "web", "port": free_port(HOST_A), "health": {"none": True},
        "upstreams": [{"name": "payments", "local_port": upstream}]}])
    host_a = await start_daemon(nursery, a_conf)
    url = f"http://127.0.0.1:{upstream}/pay"

    async def answered() -> bool:
        return (await http.get(url)).status_code == 200
    await wait_for(answered)

    first = {d: d.identity.status.identities for d in (host_a, host_b)}
    statuses: list[int] = []
    with trio.fail_after(30):
        while min(len(audit_renewals(mesh, n)) for n in ("host-a", "host-b")) < 2:
            statuses.append((await http.get(url)).status_code)
    # certificates of 6 s, renewed at 3-4.2 s: every request answered all along
    assert statuses and set(statuses) == {200}, statuses
    for daemon, before in first.items():
        now = daemon.identity.status.identities
        assert all(now[s].serial != before[s].serial for s in before)

    state = (await http.get(f"http://{a_conf.admin_host}:{a_conf.admin_port}/v1/state")).json()
    identity = state["identity"]
    assert identity["node"]["spiffe_id"] == f"spiffe://{TD}/node/host-a"
    # (a few seconds' lifetimes: on a busy machine the snapshot may catch a late renewal)
    assert identity["certificates"]["web"]["state"] in ("valid", "renewal_due", "expiring")
    assert identity["failures"] == 0 and identity["last_renewal"]
    assert state["certificates"][0]["serial"] == identity["certificates"]["web"]["serial"]
    metrics = (await http.get(f"http://{a_conf.admin_host}:{a_conf.admin_port}/metrics")).text
    assert 'meshd_cert_renewals_total{result="ok"}' in metrics
    assert "meshd_node_cert_expiry_timestamp_seconds" in metrics
    await host_a.stop()
    await host_b.stop()


def audit_renewals(mesh: DaemonMesh, node: str) -> list[dict[str, object]]:
    """Issuances the node obtained with its node certificate (not with the token)."""
    return [r for r in audit.read(mesh.ca_dir)
            if r["action"] == "issue" and r["what"] == f"spiffe://{TD}/node/{node}"
            and "(certificate " in str(r["who"])]


async def test_a_restart_after_the_token_was_spent_renews_with_the_node_certificate(
    nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    mesh = await open_mesh(nursery, tmp_path, http)
    app_port = free_port(HOST_B)
    await nursery.start(app, HOST_B, app_port, "payments")
    config = mesh.host_config("host-b", HOST_B, payments(app_port))
    daemon = await start_daemon(nursery, config)
    first = daemon.identity.status.node
    await daemon.stop()
    assert audit_renewals(mesh, "host-b") == []

    # the token was single use: only the node certificate can bring this host back
    again = await start_daemon(nursery, config)
    assert again.state.ready
    node = again.identity.status.node
    assert node is not None and first is not None and node.serial != first.serial
    (renewal,) = audit_renewals(mesh, "host-b")
    assert first.serial in str(renewal["who"])
    refusals = [r for r in audit.read(mesh.ca_dir) if r["action"] == "refuse"]
    assert refusals == []
    await again.stop()
    # neither the daemons nor the CA ever logged the token's secret or a key
    secret = config.ca.token_file.read_text().strip().split(".")[1]
    for text in (caplog.text, (mesh.ca_dir / "audit.log").read_text()):
        assert secret not in text and "PRIVATE KEY" not in text
    for key in (config.state_dir / "certs").glob("*.key"):
        assert key.stat().st_mode & 0o777 == 0o600
