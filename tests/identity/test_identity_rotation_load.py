"""Load across renewals and a whole root rotation, with zero failed requests.

Real daemons on loopback, certificates of 6 s (so every host renews every 3-4 s), HTTP requests
(pooled mTLS connections) and TCP connections (one fresh mTLS handshake each) flowing all along
while the operator rotates the root, the hosts pick up the new bundle and move to new-root
leaves, and the operator finishes the rotation as soon as the CA allows it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trio
from daemon_testing import (
    DaemonMesh,
    app,
    open_mesh,
    single_route,
    start_daemon,
    until,
    wait_for,
)
from identity_testing import echo_server
from net_testing import free_port

from meshd.ca import operations, store
from meshd.daemon.lifetime import Daemon
from meshd.errors import CAError
from meshd.identity import keys

HOST_A, HOST_B = "127.0.23.2", "127.0.23.3"
HTTP_CLIENTS = 6
TCP_CLIENTS = 2


@dataclass
class Load:
    ok: int = 0
    tcp_ok: int = 0
    failures: list[str] = field(default_factory=list)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=HTTP_CLIENTS, max_keepalive_connections=HTTP_CLIENTS)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        yield client


def roots_of(daemon: Daemon) -> set[str]:
    bundle = daemon.identity.status.bundle
    return set(bundle.fingerprints()) if bundle else set()


def leaves_from(daemon: Daemon, fingerprint: str, mesh: DaemonMesh) -> bool:
    root = store.load_ca(mesh.ca_dir)
    signer = root.signer.cert if root.fingerprint == fingerprint else root.previous
    status = daemon.identity.status
    certs = [i.certificate() for i in status.identities.values()]
    certs += [status.node.certificate()] if status.node else []
    return signer is not None and all(keys.verify_issued_by(c, [signer]) for c in certs)


async def test_zero_failed_requests_across_renewals_and_a_root_rotation(
    nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    mesh = await open_mesh(nursery, tmp_path, http, leaf_lifetime=timedelta(seconds=6))
    old_root = store.load_ca(mesh.ca_dir).fingerprint
    app_port, echo_port = free_port(HOST_B), free_port(HOST_B)
    await nursery.start(app, HOST_B, app_port, "payments")
    await nursery.start(echo_server, HOST_B, echo_port)
    await mesh.put_routes(single_route("payments", "v1"))
    host_b = await start_daemon(nursery, mesh.host_config("host-b", HOST_B, [
        {"name": "payments", "port": app_port, "address": HOST_B,
         "health": {"http": "/healthz", "interval": "200ms"}},
        {"name": "ledger", "port": echo_port, "address": HOST_B, "protocol": "tcp",
         "health": {"tcp": True, "interval": "200ms"}}]))
    http_port, tcp_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    host_a = await start_daemon(nursery, mesh.host_config("host-a", HOST_A, [{
        "name": "web", "port": free_port(HOST_A), "health": {"none": True},
        "upstreams": [{"name": "payments", "local_port": http_port},
                      {"name": "ledger", "local_port": tcp_port, "protocol": "tcp"}]}]))
    url = f"http://127.0.0.1:{http_port}/pay"

    async def answered() -> bool:
        return (await http.get(url)).status_code == 200
    await wait_for(answered)

    load = Load()
    stop = trio.Event()

    async def http_client() -> None:
        while not stop.is_set():
            try:
                response = await http.get(url)
            except httpx.HTTPError as exc:
                load.failures.append(f"http: {exc!r}")
                continue
            if response.status_code == 200:
                load.ok += 1
            else:
                load.failures.append(f"http {response.status_code}: {response.text[:200]}")

    async def tcp_client(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            payload = f"ping {n}/{i}".encode()
            try:
                with trio.fail_after(5):
                    stream = await trio.open_tcp_stream("127.0.0.1", tcp_port)
                    try:
                        await stream.send_all(payload)
                        got = b""
                        while len(got) < len(payload):
                            data = await stream.receive_some()
                            if not data:
                                break
                            got += data
                    finally:
                        await stream.aclose()
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                load.failures.append(f"tcp: {exc!r}")
                continue
            if got == payload:
                load.tcp_ok += 1
            else:
                load.failures.append(f"tcp: sent {payload!r}, got {got!r}")

    async with trio.open_nursery() as clients:
        for _ in range(HTTP_CLIENTS):
            clients.start_soon(http_client)
        for n in range(TCP_CLIENTS):
            clients.start_soon(tcp_client, n)
        daemons = (host_a, host_b)
        with trio.fail_after(60):
            # renewals under load
            before = {d: d.identity.status.node for d in daemons}
            await until(lambda: all(d.identity.status.node != before[d] for d in daemons))
            # the operator starts a rotation
            rotated = operations.rotate_ca(mesh.ca_dir, now=datetime.now(UTC), who="test")
            new_root = rotated.fingerprint
            await until(lambda: all(roots_of(d) == {old_root, new_root} for d in daemons))
            await until(lambda: all(leaves_from(d, new_root, mesh) for d in daemons))
            # and finishes it as soon as the CA lets them (it refuses until every host has
            # confirmed its new-root certificates)
            while True:
                try:
                    operations.finish_rotation(mesh.ca_dir, now=datetime.now(UTC), who="test")
                    break
                except CAError as exc:
                    assert "still depend on the previous root" in str(exc)
                    await trio.sleep(0.2)
            await until(lambda: all(roots_of(d) == {new_root} for d in daemons))
            # a few more renewals on the new root alone
            after = {d: d.identity.status.node for d in daemons}
            await until(lambda: all(d.identity.status.node != after[d] for d in daemons))
        stop.set()

    assert load.failures == [], load.failures[:5]
    assert load.ok > 100 and load.tcp_ok > 20, (load.ok, load.tcp_ok)
    for daemon in (host_a, host_b):
        assert daemon.identity.status.failures == 0
    await host_a.stop()
    await host_b.stop()
