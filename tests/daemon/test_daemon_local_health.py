"""Readiness tells the truth about the local apps: a meshd whose local app was stopped (a real
child process, killed) answers ``/readyz`` 503 naming the service, ``meshd status`` exits 1 and
prints why, while the daemon still forwards this host's outbound traffic; the app back, ready
again. A refused reload and changes waiting for a restart show in ``/v1/state`` and in
``meshd status``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomlkit
import trio
from mesh_testing import Mesh, open_mesh, start_daemon, wait_for
from net_testing import free_port

from meshd.cli import exits
from meshd.daemon.reload import reload_from_file

TD = "health.mesh"
HOST = "127.0.21.2"


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield await open_mesh(nursery, tmp_path, http, TD)


class App:
    """A real app process (``python -m http.server``) that the test stops and starts again."""

    def __init__(self, port: int, root: Path) -> None:
        self.port, self.root = port, root
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", HOST,
             "--directory", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "healthz").write_text("ok\n")
    served = App(free_port(HOST), root)
    served.start()
    try:
        yield served
    finally:
        served.stop()


def meshd_status(admin: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd", "status", "--admin", admin, *extra],
                          capture_output=True, text=True, timeout=30, check=False)


async def test_a_stopped_app_makes_the_host_not_ready(
    mesh: Mesh, nursery: trio.Nursery, app: App, tmp_path: Path,
) -> None:
    upstream_port = free_port("127.0.0.1")
    conf = mesh.host_config("host-a", HOST, host_data(
        mesh, "host-a", HOST, 0, "", app.port, upstream_port)["services"])

    async def reachable() -> bool:  # the app process answers before meshd probes it first
        try:
            return (await mesh.http.get(f"http://{HOST}:{app.port}/healthz")).status_code == 200
        except httpx.HTTPError:
            return False
    await wait_for(reachable)
    daemon = await start_daemon(nursery, conf)
    admin = f"{conf.admin_host}:{conf.admin_port}"

    async def readyz() -> httpx.Response:
        return await mesh.http.get(f"http://{admin}/readyz")

    assert (await readyz()).status_code == 200
    done = await trio.to_thread.run_sync(meshd_status, admin)
    assert done.returncode == exits.OK, done.stdout + done.stderr
    assert ": READY" in done.stdout

    # the app dies: not ready, naming it; the daemon itself still serves its outbound listener
    app.stop()

    async def not_ready() -> bool:
        return (await readyz()).status_code == 503
    await wait_for(not_ready)
    answer = await readyz()
    assert answer.text.startswith("not ready: local service web is critical: HTTP GET "), \
        answer.text
    done = await trio.to_thread.run_sync(meshd_status, admin)
    assert done.returncode == exits.FAILED, done.stdout + done.stderr
    assert ": NOT READY" in done.stdout
    assert "  not ready: local service web is critical: HTTP GET" in done.stdout
    assert "meshd itself is ready" in done.stdout
    done = await trio.to_thread.run_sync(meshd_status, admin, "-o", "json")
    document = json.loads(done.stdout)
    assert done.returncode == exits.FAILED and document["exit_code"] == exits.FAILED
    assert document["ready"] is False and document["state"]["daemon_ready"] is True
    assert document["state"]["not_ready"][0].startswith("local service web is critical")
    # outbound forwarding goes on: the upstream listener answers (503: no payments instance)
    r = await mesh.http.get(f"http://127.0.0.1:{upstream_port}/pay")
    assert r.status_code == 503

    # back: ready again
    app.start()

    async def ready_again() -> bool:
        return (await readyz()).status_code == 200
    await wait_for(ready_again)
    done = await trio.to_thread.run_sync(meshd_status, admin)
    assert done.returncode == exits.OK, done.stdout + done.stderr

    # a refused reload and a change that waits for a restart: in /v1/state and in status
    toml = tmp_path / "meshd.toml"
    toml.write_text("node = 'host-a'\n[inbound]\nport = 70000\n")
    assert await reload_from_file(daemon, toml) is None
    state = (await mesh.http.get(f"http://{admin}/v1/state")).json()
    assert state["reload"]["result"] == "refused" and state["reload"]["file"] == str(toml)
    assert any("inbound.port: port 70000 out of range" in p for p in state["reload"]["problems"])
    done = await trio.to_thread.run_sync(meshd_status, admin)
    assert done.returncode == exits.OK  # it serves on the configuration in force
    assert f"reload REFUSED at {state['reload']['at']}" in done.stdout
    assert "inbound.port: port 70000 out of range" in done.stdout


    # a valid file that moves the inbound port: waits for a restart, key + values + reason
    data = host_data(mesh, conf.node, HOST, conf.inbound_port, admin, conf.services[0].port,
                     upstream_port)
    data["inbound"] = {"port": conf.inbound_port + 1}
    toml = mesh.tmp / "host-a" / "meshd.toml"
    toml.write_text(tomlkit.dumps(data))
    plan = await reload_from_file(daemon, toml)
    assert plan is not None and [c.key for c in plan.needs_restart] == ["inbound.port"]
    state = (await mesh.http.get(f"http://{admin}/v1/state")).json()
    assert state["reload"]["result"] == "applied"
    assert state["reload"]["needs_restart"] == [{
        "key": "inbound.port", "old": str(conf.inbound_port),
        "new": str(conf.inbound_port + 1),
        "reason": "the inbound mTLS listener is bound at start"}]
    done = await trio.to_thread.run_sync(meshd_status, admin)
    assert done.returncode == exits.OK, done.stdout + done.stderr
    assert f"RESTART NEEDED: 1 change(s) in {toml}" in done.stdout
    assert (f"  inbound.port: {conf.inbound_port} -> {conf.inbound_port + 1} (the inbound mTLS "
            "listener is bound at start)") in done.stdout

    await daemon.stop()


def host_data(mesh: Mesh, node: str, address: str, inbound: int, admin: str, app_port: int,
              upstream_port: int) -> dict[str, Any]:
    """meshd.toml of the host in this test, as a mapping (paths relative to its directory)."""
    return {
        "node": node, "address": address, "trust_domain": TD,
        "registry": mesh.registry_url, "state_dir": "state",
        "ca": {"url": mesh.ca_url, "fingerprint": mesh.fingerprint,
               "token_file": "join-token"},
        "inbound": {"port": inbound}, "admin": {"address": admin},
        "services": [{"name": "web", "port": app_port, "address": address,
                      "health": {"http": "/healthz", "interval": "100ms", "timeout": "1s"},
                      "upstreams": [{"name": "payments", "local_port": upstream_port}]}],
    }
