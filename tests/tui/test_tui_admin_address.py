"""The console finds each meshd's admin API where the meshd publishes it in the registry (Meta
``meshd-admin`` and ``meshd-admin-tls`` of its registrations), not at ``<host address>:
--admin-port``: real daemons on loopback with admin APIs on addresses and free ports of their
own (one of them over mutual TLS), an in-process registry and CA, and the console's data source
built from the real ``meshd tui`` options, under asyncio in a thread beside the trio daemons."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from net_testing import free_port

from meshd.ca.server import serve_ca
from meshd.ca.store import TokenStore, init_ca
from meshd.cli.main import build_parser
from meshd.cli.tui import admin_tls
from meshd.config.parse import parse_host_config
from meshd.daemon.lifetime import Daemon
from meshd.registry.embedded.server import RegistryConfig, listen_port, serve_registry
from tui.model import MeshModel
from tui.observe import Instance, Observation, instances_from_health_connect
from tui.source import RegistrySource, on_this_machine
from tui.views import host_rows, service_detail

TD = "console.mesh"
# each host's own address (inbound) and, apart from it, its admin API's
HOSTS = {"host-a": ("127.0.31.1", "127.0.32.1", False),
         "host-b": ("127.0.31.2", "127.0.32.2", False),
         "host-c": ("127.0.31.3", "127.0.32.3", True)}  # admin over TLS


@dataclasses.dataclass
class Mesh:
    registry_url: str
    ca_dir: Path
    tmp: Path
    admin: dict[str, str]  # node -> the admin HOST:PORT it listens on


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    listeners = await nursery.start(serve_registry, RegistryConfig(host="127.0.0.1", port=0))
    registry_url = f"http://127.0.0.1:{listen_port(listeners)}"
    init_ca(tmp_path / "ca", TD, now=datetime.now(UTC))
    endpoint = await nursery.start(partial(serve_ca, tmp_path / "ca", "127.0.0.1", 0))
    daemons: list[Daemon] = []
    admin: dict[str, str] = {}
    try:
        for node, (address, admin_host, tls) in HOSTS.items():
            base = tmp_path / node
            base.mkdir()
            token, _ = TokenStore(tmp_path / "ca").mint(
                node, ["payments"], now=datetime.now(UTC), ttl=timedelta(hours=1))
            (base / "join-token").write_text(token + "\n")
            admin[node] = f"{admin_host}:{free_port(admin_host)}"
            config = parse_host_config({
                "node": node, "address": address, "trust_domain": TD,
                "registry": registry_url, "state_dir": "state",
                "ca": {"url": endpoint.url, "fingerprint": endpoint.fingerprint,
                       "token_file": "join-token"},
                "inbound": {"port": free_port(address)},
                "admin": {"address": admin[node], "tls": tls},
                "services": [{"name": "payments", "version": "v1", "address": address,
                              "port": free_port(address), "health": {"none": True}}],
            }, f"{node}.toml", base)
            daemon = Daemon(config)
            daemons.append(daemon)
            with trio.fail_after(20):
                await nursery.start(daemon.run)
        yield Mesh(registry_url, tmp_path / "ca", tmp_path, admin)
    finally:
        for daemon in daemons:
            await daemon.stop()


def poll_until(mesh: Mesh, argv: list[str], done: Callable[[Observation], bool],
               here: Callable[[str], bool] | None = None, within: float = 15.0
               ) -> list[Observation]:
    """The console's data source as ``meshd tui --registry URL --admin-port P ARGV`` builds it
    (P: a port no admin API listens on, so a host read there would fail), polled under asyncio
    until ``done`` or time runs out; every observation made."""
    args = build_parser().parse_args(["tui", "--registry", mesh.registry_url,
                                      "--admin-port", str(free_port()), *argv])

    async def main() -> list[Observation]:
        extra: dict[str, Any] = {"here": here} if here is not None else {}
        source = RegistrySource(args.registry, args.admin_port, timeout=2.0,
                                admin_tls=admin_tls(args),
                                admin_client_cert=bool(args.admin_cert), **extra)
        seen: list[Observation] = []
        deadline = time.monotonic() + within
        try:
            while time.monotonic() < deadline:
                seen.append(await source.poll())
                if done(seen[-1]):
                    break
                await asyncio.sleep(0.1)
        finally:
            await source.aclose()
        return seen

    return asyncio.run(main())


def by_node(obs: Observation) -> dict[str, tuple[str, str, bool]]:
    """node -> (admin key, error, read) for every host the console knows."""
    return {h.node: (h.admin, h.error, h.ok) for h in obs.hosts}


def operator(mesh: Mesh) -> list[str]:
    """``meshd ca issue --operator alice`` and the ``meshd tui`` options that present it."""
    out = mesh.tmp / "alice"
    args = build_parser().parse_args(["ca", "issue", "--dir", str(mesh.ca_dir),
                                      "--operator", "alice", "--out", str(out)])
    assert args.func(args) == 0
    return ["--admin-ca", str(out / "ca.crt"), "--admin-cert", str(out / "alice.crt"),
            "--admin-key", str(out / "alice.key")]


@pytest.mark.trio
async def test_each_meshd_publishes_its_admin_address_and_whether_it_needs_tls(
        mesh: Mesh) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{mesh.registry_url}/v1/health/connect/payments")
    published = {e["Service"]["Meta"]["meshd-node"]: (e["Service"]["Meta"]["meshd-admin"],
                                                      e["Service"]["Meta"]["meshd-admin-tls"])
                 for e in answer.json()}
    assert published == {node: (mesh.admin[node], "true" if tls else "false")
                         for node, (_, _, tls) in HOSTS.items()}


@pytest.mark.trio
async def test_the_console_reads_every_host_at_its_published_address(mesh: Mesh) -> None:
    seen = await trio.to_thread.run_sync(
        poll_until, mesh, operator(mesh), lambda o: len(o.hosts) == 3 and all(
            h.ok for h in o.hosts))
    # host-c over mutual TLS with the operator certificate; host-a and host-b over plain
    # HTTP as they publish, though the console was given TLS files
    assert by_node(seen[-1]) == {n: (a, "", True) for n, a in mesh.admin.items()}
    model = MeshModel()
    for obs in seen:
        model.ingest(obs)
    rows = {r.record.node: r for r in host_rows(model, time.time())}
    assert sorted(rows) == sorted(HOSTS) and all(r.record.reachable for r in rows.values())
    # each instance is matched to its host (by node: the admin API is not on its address)
    detail = service_detail(model, "payments", time.time())
    assert {(i.node, i.host.admin if i.host else "") for i in detail.instances} == set(
        mesh.admin.items())


@pytest.mark.trio
async def test_without_an_operator_certificate_a_tls_host_says_so_and_others_are_read(
        mesh: Mesh) -> None:
    seen = await trio.to_thread.run_sync(
        poll_until, mesh, [], lambda o: len(o.hosts) == 3 and sum(h.ok for h in o.hosts) == 2)
    hosts = by_node(seen[-1])
    assert hosts["host-c"] == (mesh.admin["host-c"], "admin API over TLS: an operator "
                               "certificate is required (--admin-ca, --admin-cert, --admin-key)",
                               False)
    assert hosts["host-a"][2] and hosts["host-b"][2]


@pytest.mark.trio
async def test_from_another_machine_a_loopback_admin_is_named_not_timed_out(
        mesh: Mesh) -> None:
    """The console on an operator's machine: no host address is this machine's."""
    seen = await trio.to_thread.run_sync(
        poll_until, mesh, operator(mesh), lambda o: len(o.hosts) == 3, lambda address: False)
    # the first observation that lists the hosts already says why: nothing was waited for
    assert by_node(seen[-1]) == {
        node: (f"{mesh.admin[node]} on {address}",
               f"admin on loopback only ({mesh.admin[node]}): not reachable from here", False)
        for node, (address, _, _) in HOSTS.items()}
    model = MeshModel()
    model.ingest(seen[-1])
    assert (f"host-a ({mesh.admin['host-a']} on 127.0.31.1) unreachable: admin on loopback "
            f"only ({mesh.admin['host-a']}): not reachable from here") in [
        e.text for e in model.events]


def test_a_host_that_publishes_nothing_is_read_at_its_address_and_the_admin_port() -> None:
    """An older meshd (no ``meshd-admin`` Meta): ``--admin-port`` on its host's address."""
    entry = {"Service": {"ID": "payments-old-sidecar-proxy", "Address": "fd00::7", "Port": 15001,
                         "Meta": {"version": "v1", "meshd-node": "old"},
                         "Proxy": {"DestinationServiceID": "payments-old"}},
             "Checks": [{"Status": "passing"}]}
    (old,) = instances_from_health_connect("payments", [entry])
    assert (old.admin, old.admin_tls) == ("", False)
    published = dataclasses.replace(old, admin="[fd00::7]:15100", admin_tls=True)

    async def targets() -> list[tuple[str, str, bool | None, str]]:
        source = RegistrySource("http://127.0.0.1:1", 15009, here=lambda address: False)
        try:
            return [(k, t.address, t.tls, t.unreachable)
                    for k, t in map(source.admin_target, [old, published])]
        finally:
            await source.aclose()

    assert asyncio.run(targets()) == [
        ("[fd00::7]:15009", "[fd00::7]:15009", None, ""),
        ("[fd00::7]:15100", "[fd00::7]:15100", True, "admin API over TLS: an operator "
         "certificate is required (--admin-ca, --admin-cert, --admin-key)")]


def test_this_machines_addresses_are_those_it_can_bind() -> None:
    assert on_this_machine("127.0.31.9") and on_this_machine("127.0.0.1")
    assert not on_this_machine("192.0.2.1")  # TEST-NET-1: nobody's (bound, never sent to)
    assert not on_this_machine("not an address")


def test_instances_carry_what_their_host_published() -> None:
    entry = {"Service": {"ID": "p", "Address": "10.0.0.5", "Port": 15001,
                         "Meta": {"meshd-node": "b", "meshd-admin": "10.0.0.5:15000",
                                  "meshd-admin-tls": "true"}}}
    (inst,) = instances_from_health_connect("payments", [entry])
    assert inst == Instance("payments", "p", "b", "10.0.0.5", 15001, "", "passing",
                            "10.0.0.5:15000", True)
