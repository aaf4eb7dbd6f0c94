"""`meshd ca rotate --finish` asks every meshd to renew now, with real processes.

A `meshd ca serve` and three `meshd run` children (certificates of 24 h, so no natural renewal
happens during the test); the registry and the apps run in the test process. Requests flow from
host-a to the payments instances on host-b and host-c all along (bounded in count and time)
while the operator rotates the root and runs `meshd ca rotate --finish`: every host is told to
renew on its next deny-list poll, renews within the spread, and the command retires the old root
once every node has confirmed its new-root certificates.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from daemon_testing import app, single_route
from mesh_testing import Mesh, wait_for
from net_testing import free_port
from proc_testing import stop_process

from meshd.ca import audit
from meshd.ca.store import TokenStore, init_ca, load_ca
from meshd.identity import keys
from meshd.registry.embedded.server import RegistryConfig, listen_port, serve_registry
from meshd.registry.operator_key import OperatorKey

TD = "finish.mesh"
HOSTS = {"host-a": "127.0.47.1", "host-b": "127.0.47.2", "host-c": "127.0.47.3"}
MAX_REQUESTS = 20_000  # the load loop's bound in count (and the test's fail_after in time)


@dataclass
class Host:
    name: str
    admin: str
    log: Path


@dataclass
class Fleet:
    ca_dir: Path
    hosts: list[Host]
    outbound: str
    registry: str
    operator_serial: str  # of the operator certificate that signed the route table
    tmp: Path


@dataclass
class Load:
    ok: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)


def _env() -> dict[str, str]:
    return os.environ | {"MESHD_LOG_LEVEL": "info"}


async def _start(argv: list[str], log: Path) -> trio.Process:
    with log.open("wb") as out:
        return await trio.lowlevel.open_process(
            [sys.executable, "-m", "meshd", *argv], stdout=out, stderr=subprocess.STDOUT,
            env=_env())


async def _ca_command(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([sys.executable, "-m", "meshd", "ca", *args],
                                  capture_stdout=True, capture_stderr=True, check=False,
                                  env=_env())


def _host_toml(name: str, address: str, registry: str, ca_url: str, fingerprint: str,
               services: str) -> str:
    return (f'node = "{name}"\naddress = "{address}"\ntrust_domain = "{TD}"\n'
            f'registry = "{registry}"\nstate_dir = "state"\n'
            f'[ca]\nurl = "{ca_url}"\nfingerprint = "{fingerprint}"\n'
            f'token_file = "join-token"\n'
            f'[inbound]\nport = {free_port(address)}\n'
            f'[admin]\naddress = "{address}:{free_port(address)}"\n' + services)


@pytest.fixture
async def fleet(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Fleet]:
    listeners = await nursery.start(serve_registry, RegistryConfig(host="127.0.0.1", port=0))
    registry = f"http://127.0.0.1:{listen_port(listeners)}"
    ca_dir = tmp_path / "ca"
    init_ca(ca_dir, TD, now=datetime.now(UTC))
    fingerprint = load_ca(ca_dir).fingerprint
    ca_port = free_port()
    ca_url = f"https://127.0.0.1:{ca_port}"
    procs: list[trio.Process] = []
    try:
        ca_log = tmp_path / "ca.log"
        procs.append(await _start(["ca", "serve", "--dir", str(ca_dir), "--listen",
                                   f"127.0.0.1:{ca_port}"], ca_log))

        async def ca_listening() -> bool:
            return "listening on" in ca_log.read_text(errors="replace")
        await wait_for(ca_listening, 30)
        async with httpx.AsyncClient(timeout=10) as http:
            mesh = Mesh(registry, ca_url, fingerprint, ca_dir, tmp_path, http, TD)
            await mesh.put_routes(single_route("payments", "v1"))
            upstream = free_port()
            hosts = []
            for name, address in HOSTS.items():
                if name == "host-a":
                    services = (f'[[services]]\nname = "web"\nport = {free_port(address)}\n'
                                f'health = {{ none = true }}\n'
                                f'upstreams = [{{ name = "payments", local_port = {upstream} }}]\n')
                else:
                    app_port = free_port(address)
                    await nursery.start(app, address, app_port, "payments")
                    services = (f'[[services]]\nname = "payments"\nport = {app_port}\n'
                                f'address = "{address}"\n'
                                f'health = {{ http = "/healthz", interval = "200ms" }}\n')
                base = tmp_path / name
                base.mkdir()
                token, _ = TokenStore(ca_dir).mint(name, ["web", "payments"],
                                                   now=datetime.now(UTC), ttl=timedelta(hours=1))
                (base / "join-token").write_text(token + "\n")
                toml = _host_toml(name, address, registry, ca_url, fingerprint, services)
                (base / "meshd.toml").write_text(toml)
                admin = toml.split('[admin]\naddress = "', 1)[1].split('"', 1)[0]
                procs.append(await _start(["run", "--config", str(base / "meshd.toml")],
                                          base / "meshd.log"))
                hosts.append(Host(name, f"http://{admin}", base / "meshd.log"))
            outbound = f"http://127.0.0.1:{upstream}/pay"

            async def serving() -> bool:
                try:
                    return (await http.get(outbound)).status_code == 200
                except httpx.HTTPError:
                    return False
            await wait_for(serving, 60)

            # host-a reaching one payments host is not the whole fleet: every meshd is up once
            # its admin API answers with its node identity
            async def host_ready(host: Host) -> bool:
                try:
                    return bool((await _identity(http, host))["node"])
                except httpx.HTTPError:
                    return False
            for host in hosts:
                await wait_for(partial(host_ready, host), 60)
            operator_serial = keys.serial_hex(
                x509.load_pem_x509_certificate(mesh.operator.cert_pem))
        yield Fleet(ca_dir, hosts, outbound, registry, operator_serial, tmp_path)
    finally:
        for proc in procs:
            await stop_process(proc)


async def _identity(http: httpx.AsyncClient, host: Host) -> dict[str, Any]:
    identity: dict[str, Any] = (await http.get(f"{host.admin}/v1/state")).json()["identity"]
    return identity


async def test_rotate_finish_renews_every_meshd_now_under_load(fleet: Fleet) -> None:
    old_root = load_ca(fleet.ca_dir).fingerprint
    load = Load()
    stop = trio.Event()
    async with httpx.AsyncClient(timeout=10) as http:
        before = {h.name: (await _identity(http, h))["node"]["serial"] for h in fleet.hosts}

        async def client() -> None:
            while not stop.is_set() and load.total < MAX_REQUESTS:
                try:
                    response = await http.get(fleet.outbound)
                except httpx.HTTPError as exc:
                    load.failures.append(repr(exc))
                    continue
                if response.status_code == 200:
                    load.ok += 1
                else:
                    load.failures.append(f"{response.status_code}: {response.text[:200]}")

        async with trio.open_nursery() as clients:
            for _ in range(4):
                clients.start_soon(client)
            with trio.fail_after(90):
                rotated = await _ca_command("rotate", "--dir", str(fleet.ca_dir))
                assert rotated.returncode == 0, rotated.stderr.decode()
                new_root = rotated.stdout.decode().strip()
                assert new_root != old_root

                async def trust_both() -> bool:
                    for host in fleet.hosts:
                        if set((await _identity(http, host))["roots"]) != {old_root, new_root}:
                            return False
                    return True
                await wait_for(trust_both, 20)

                # the operator certificate was issued offline: no node renews it. The operator
                # issues a new one, signs the route table with it, revokes the old one
                out = fleet.tmp / "operator-new"
                issued = await _ca_command("issue", "--dir", str(fleet.ca_dir), "--operator",
                                           "ops", "--out", str(out))
                assert issued.returncode == 0, issued.stderr.decode()
                operator = OperatorKey.from_files(out / "ops.crt", out / "ops.key")
                serial = keys.serial_hex(x509.load_pem_x509_certificate(operator.cert_pem))
                await Mesh(fleet.registry, "", "", fleet.ca_dir, fleet.tmp, http, TD,
                           operator).put_routes(single_route("payments", "v1"))

                async def signed_by_new_operator() -> bool:
                    for host in fleet.hosts:
                        state = (await http.get(f"{host.admin}/v1/state")).json()
                        if (state["routes_signed"] or {}).get("serial") != serial:
                            return False
                    return True
                await wait_for(signed_by_new_operator, 20)
                revoked = await _ca_command("revoke", "--dir", str(fleet.ca_dir), "--serial",
                                            fleet.operator_serial)
                assert revoked.returncode == 0, revoked.stderr.decode()

                started = time.monotonic()
                finished = await _ca_command("rotate", "--dir", str(fleet.ca_dir), "--finish",
                                             "--spread", "2s", "--timeout", "30s")
                took = time.monotonic() - started
                progress = finished.stderr.decode()
                assert finished.returncode == 0, progress
                assert finished.stdout.decode().strip() == new_root
                assert "asked 3 node(s) still on the previous root to renew now" in progress
                assert "3/3 node(s) on the new root" in progress

                async def only_new_root() -> bool:
                    for host in fleet.hosts:
                        if (await _identity(http, host))["roots"] != [new_root]:
                            return False
                    return True
                await wait_for(only_new_root, 20)
                await trio.sleep(1)  # traffic on the new root alone
            stop.set()

        for host in fleet.hosts:
            identity = await _identity(http, host)
            assert identity["node"]["serial"] != before[host.name]
            assert identity["last_renewal_reason"].startswith("asked by the CA"), identity
            assert identity["renewal_asked"] is None
            assert identity["failures"] == 0
            assert "the CA asks this host to renew now" in host.log.read_text(errors="replace")

    print(f"--finish took {took:.1f}s; requests: {len(load.failures)} failed / {load.total}")
    assert load.failures == [], load.failures[:5]
    assert load.ok > 50, load.ok
    actions = [record["action"] for record in audit.read(fleet.ca_dir)]
    assert actions[-1] == "rotate_finish", actions[-5:]
    asked = actions.index("renew_requested")
    assert actions[asked + 1:-1].count("issue") == 6, actions[asked:]  # 3 nodes x (node + 1)
