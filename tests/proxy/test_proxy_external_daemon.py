"""External services in a whole daemon: the route table (signed, from the embedded registry's
KV) declares the bank; the daemon's outbound listener and egress proxy listener reach it with
TLS originated and verified; ``/v1/state`` and ``meshd explain`` show it. Registry, CA and
daemon in-process, on real loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from external_testing import TLSBackend, server_files, write_ca
from mesh_testing import Mesh, open_mesh, start_daemon, wait_for
from net_testing import free_port
from proxy_testing import MiniCA

from meshd.explain.route import explain, render
from meshd.proxy.core.matcher import RequestFacts

TD = "test.mesh"
HOST = "127.0.30.7"


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        yield await open_mesh(nursery, tmp_path, http, TD)


async def test_a_daemon_calls_a_declared_external_service_and_shows_it(
        mesh: Mesh, nursery: trio.Nursery, tmp_path: Path) -> None:
    bank_ca = MiniCA.create("bank test root")
    cert, key = server_files(bank_ca, tmp_path / "bank", "bank.test")
    bank = TLSBackend("bank", "external", cert_file=cert, key_file=key)
    await nursery.start(bank.serve)
    ca_file = write_ca(bank_ca, tmp_path / "bank-ca.pem")
    await mesh.put_routes({"egress": "registered-only", "destinations": {"bank": {
        "external": {"addresses": [f"127.0.0.1:{bank.port}"], "sni": "bank.test",
                     "ca_file": str(ca_file)},
        "timeout": "5s"}}})
    local_port, egress_port = free_port(), free_port()
    conf = mesh.host_config("host-p", HOST, [{
        "name": "payments", "port": free_port(HOST), "address": HOST,
        "health": {"none": True}, "upstreams": [{"name": "bank", "local_port": local_port}]}],
        outbound={"egress_port": egress_port})
    await start_daemon(nursery, conf)

    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        async def charged() -> bool:
            r = await client.post(f"http://127.0.0.1:{local_port}/charge", content=b"1")
            return r.status_code == 200 and r.json()["path"] == "/charge"
        await wait_for(charged)
    proxy = f"http://127.0.0.1:{egress_port}"
    async with httpx.AsyncClient(timeout=10, proxy=proxy) as client:
        declared = await client.get("http://bank.test/version")
        assert declared.status_code == 200 and declared.json()["service"] == "bank"
        undeclared = await client.get("http://elsewhere.test/")
        assert undeclared.status_code == 403
        assert undeclared.headers["x-meshd-error"] == "egress-denied"

    admin = f"http://{conf.admin_host}:{conf.admin_port}"
    state = (await mesh.http.get(f"{admin}/v1/state")).json()
    entry = state["destinations"]["bank"]
    assert [(e["address"], e["port"], e["node"]) for e in entry["endpoints"]] == [
        ("127.0.0.1", bank.port, "bank.test")]
    assert entry["external"]["ca_file"] == str(ca_file)
    assert state["egress"] == {"mode": "registered-only",
                               "listener": f"127.0.0.1:{egress_port}"}
    metrics = (await mesh.http.get(f"{admin}/metrics")).text
    assert ('meshd_egress_requests_total{destination="",kind="http",verdict="denied"} 1.0'
            in metrics)
    text = render(explain(state, "bank", RequestFacts("POST", "/charge", [])))
    assert "external service bank, outside the mesh" in text
    assert f"verified against {ca_file} and must name bank.test" in text
    assert "authorization: none" in text
    text = render(explain(state, "elsewhere.test", RequestFacts("GET", "/", [])))
    assert f"egress proxy at 127.0.0.1:{egress_port}: elsewhere.test is not declared" in text
