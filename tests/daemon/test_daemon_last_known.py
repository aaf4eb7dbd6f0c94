"""A meshd without its control plane: started while the registry is down (after one earlier run)
it serves its last known endpoints and signed routes at once, marked stale; a registry that hangs
(a real process stopped with SIGSTOP: the kernel still accepts connections, nothing answers) is
reported stale within seconds; when the registry returns the meshd resyncs and the staleness
clears. Disk state of another trust domain or with a bad signature is not used.

The registry runs as a real child process (``meshd registry serve`` with a data directory, so it
comes back with its data); host-a, the caller, is a real ``meshd run`` process where the
timing matters to a user; the CA, host-b and the payments app run in this process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomlkit
import trio
from mesh_testing import Mesh, start_daemon, wait_for
from net_testing import free_port
from proc_testing import Output
from test_daemon import payments_app

from meshd.ca.server import serve_ca
from meshd.ca.store import init_ca
from meshd.config.parse import routes_to_data
from meshd.config.schema import DefaultPolicy, HostConfig, RouteTable
from meshd.daemon.last_known import FILE_NAME as ENDPOINTS_FILE
from meshd.daemon.lifetime import Daemon
from meshd.daemon.route_table import FILE_NAME as ROUTES_FILE

TD = "lastknown.mesh"
HOST_A = "127.0.21.2"
HOST_B = "127.0.21.3"
OPEN_TABLE = routes_to_data(RouteTable(default_policy=DefaultPolicy.ALLOW)) | {
    "destinations": {"payments": {"subsets": {"v1": {"version": "v1"}}, "split": {"v1": 100},
                                  "timeout": 5.0}}}


@dataclass
class Registry:
    """``meshd registry serve`` as a child process, on a fixed port and data directory."""

    port: int
    data_dir: Path
    log: Path
    process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, http: httpx.AsyncClient) -> None:
        with self.log.open("ab") as out:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "meshd", "registry", "serve", "--http",
                 f"127.0.0.1:{self.port}", "--data-dir", str(self.data_dir)],
                stdout=out, stderr=subprocess.STDOUT)

        async def up() -> bool:
            try:
                return (await http.get(f"{self.url}/v1/status/leader")).status_code == 200
            except httpx.HTTPError:
                return False
        await wait_for(up, 20)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)  # (if it was hung on purpose)
            self.process.kill()
            await self.process.wait()
        self.process = None


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    reg = Registry(free_port("127.0.0.1"), tmp_path / "registry", tmp_path / "registry.log")
    try:
        yield reg
    finally:
        with trio.CancelScope(shield=True):
            await reg.stop()


@pytest.fixture
def ca_scope() -> trio.CancelScope:
    """Cancelling it stops the CA (connections to it are then refused)."""
    return trio.CancelScope()


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path, registry: Registry,
               ca_scope: trio.CancelScope) -> AsyncIterator[Mesh]:
    async def ca(ca_dir: Path, *, task_status: trio.TaskStatus[Any]) -> None:
        with ca_scope:
            await serve_ca(ca_dir, "127.0.0.1", 0, task_status=task_status)

    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        await registry.start(http)
        ca_dir = tmp_path / "ca"
        init_ca(ca_dir, TD, now=datetime.now(UTC))
        endpoint = await nursery.start(ca, ca_dir)
        yield Mesh(registry.url, endpoint.url, endpoint.fingerprint, ca_dir, tmp_path, http, TD)


def payments(app_port: int) -> list[dict[str, Any]]:
    return [{"name": "payments", "port": app_port, "address": HOST_B, "version": "v1",
             "health": {"none": True}}]


def web(upstream_port: int) -> list[dict[str, Any]]:
    return [{"name": "web", "port": free_port(HOST_A), "health": {"none": True},
             "upstreams": [{"name": "payments", "local_port": upstream_port}]}]


async def payments_host(mesh: Mesh, nursery: trio.Nursery) -> HostConfig:
    app_port = free_port(HOST_B)
    await nursery.start(payments_app, HOST_B, app_port, "v1")
    conf = mesh.host_config("host-b", HOST_B, payments(app_port))
    await start_daemon(nursery, conf)
    return conf


def write_toml(conf: HostConfig, mesh: Mesh, services: list[dict[str, Any]]) -> Path:
    """``conf`` as the meshd.toml a ``meshd run`` process reads."""
    path = conf.ca.token_file.parent / "meshd.toml"
    path.write_text(tomlkit.dumps({
        "node": conf.node, "address": conf.address, "trust_domain": TD,
        "registry": mesh.registry_url, "state_dir": "state",
        "ca": {"url": mesh.ca_url, "fingerprint": mesh.fingerprint, "token_file": "join-token"},
        "inbound": {"port": conf.inbound_port},
        "admin": {"address": f"{conf.admin_host}:{conf.admin_port}"},
        "services": services,
    }))
    return path


class MeshdProcess:
    """``meshd run`` as a child process, its output read line by line."""

    def __init__(self, toml: Path) -> None:
        self.toml = toml
        self.proc: subprocess.Popen[bytes] | None = None
        self.output: Output | None = None
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshd", "run", "--config", str(self.toml)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        self.output = Output(self.proc.stdout)  # type: ignore[arg-type]

    async def stop(self) -> int:
        """SIGTERM, then kill after 20 s; the exit status."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                while proc.poll() is None:  # noqa: ASYNC110 - another process
                    await trio.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
        code = await trio.to_thread.run_sync(proc.wait)
        self.proc = None
        return code

    def log(self) -> str:
        return self.output.text(0.5) if self.output is not None else ""


@pytest.fixture
async def processes() -> AsyncIterator[list[MeshdProcess]]:
    started: list[MeshdProcess] = []
    try:
        yield started
    finally:
        with trio.CancelScope(shield=True):
            for p in started:
                await p.stop()


async def status_of(http: httpx.AsyncClient, url: str) -> int | None:
    try:
        return (await http.get(url)).status_code
    except httpx.HTTPError:
        return None


async def state_of(http: httpx.AsyncClient, conf: HostConfig) -> dict[str, Any]:
    r = await http.get(f"http://{conf.admin_host}:{conf.admin_port}/v1/state")
    return dict(r.json())


@pytest.mark.parametrize("ca_down", [False, True], ids=["registry-down", "registry-and-ca-down"])
async def test_started_with_the_registry_down_it_serves_the_last_known_state_at_once(
    mesh: Mesh, registry: Registry, nursery: trio.Nursery, ca_scope: trio.CancelScope,
    ca_down: bool, processes: list[MeshdProcess], capsys: pytest.CaptureFixture[str],
) -> None:
    """With the CA down too, the certificates on disk (valid, chaining to the bundle on disk)
    are served without waiting for it."""
    await mesh.put_routes(OPEN_TABLE)
    await payments_host(mesh, nursery)
    upstream = free_port("127.0.0.1")
    a_conf = mesh.host_config("host-a", HOST_A, web(upstream))
    host_a = MeshdProcess(write_toml(a_conf, mesh, web(upstream)))
    processes.append(host_a)
    http, url = mesh.http, f"http://127.0.0.1:{upstream}/pay"

    # a first run with the registry up: it learns payments' endpoints and keeps them
    host_a.start()
    await wait_for(lambda: _is(status_of(http, url), 200), 30)
    kept = a_conf.state_dir / ENDPOINTS_FILE

    async def endpoints_kept() -> bool:
        return kept.exists() and bool(json.loads(kept.read_bytes())["destinations"].get(
            "payments", {}).get("endpoints"))
    await wait_for(endpoints_kept)
    assert kept.stat().st_mode & 0o777 == 0o600
    assert await host_a.stop() == 0, host_a.log()

    # the registry goes down; host-a starts again and serves payments from the first seconds
    await registry.stop()
    if ca_down:
        ca_scope.cancel()
    host_a.start()
    with trio.fail_after(30):
        while await status_of(http, url) != 200:  # noqa: ASYNC110 - another process
            await trio.sleep(0.02)
    serving_after = time.monotonic() - host_a.started_at
    results = [await status_of(http, url) for _ in range(20)]
    assert results == [200] * 20, results
    ready = f"http://{a_conf.admin_host}:{a_conf.admin_port}/readyz"
    await wait_for(lambda: _is(status_of(http, ready), 200))  # ready: serving what it knew
    state = await state_of(http, a_conf)
    assert state["ready"] is True
    assert state["registry"]["stale"] is True and state["registry"]["staleness_seconds"] > 0
    assert state["registry"]["registered"] is False
    assert {w["name"]: w["source"] for w in state["registry"]["watches"]} == {
        "routes": "disk", "endpoints/payments": "disk"}
    assert state["routes_source"] == "disk"
    with trio.fail_after(20):
        status = await trio.run_process(
            [sys.executable, "-m", "meshd", "status", "--admin",
             f"{a_conf.admin_host}:{a_conf.admin_port}"], capture_stdout=True,
            capture_stderr=True, check=False)
    assert status.returncode == 0, status.stderr
    text = status.stdout.decode()
    assert "STALE" in text and "from disk" in text and "not registered yet" in text, text
    metrics = (await http.get(f"http://{a_conf.admin_host}:{a_conf.admin_port}/metrics")).text
    assert "meshd_registry_stale 1.0" in metrics
    with capsys.disabled():
        print(f"\n{'registry and CA' if ca_down else 'registry'} down at start: first "
              f"request served {serving_after:.2f}s after `meshd run` was spawned; 20/20 then "
              "answered 200")
    assert serving_after < 2.0, host_a.log()

    # the registry comes back: host-a resyncs, registers, and the staleness clears
    await registry.start(http)

    async def current() -> bool:
        reg = (await state_of(http, a_conf))["registry"]
        return (reg["stale"] is False and reg["staleness_seconds"] == 0 and reg["registered"]
                and all(w["source"] == "registry" for w in reg["watches"]))
    await wait_for(current, 20)
    services = (await http.get(f"{registry.url}/v1/agent/services")).json()
    assert "web-host-a" in services
    assert await status_of(http, url) == 200
    assert await host_a.stop() == 0, host_a.log()


async def _is(answer: Any, expected: int) -> bool:
    return bool(await answer == expected)


async def test_a_hung_registry_is_reported_stale_within_seconds_and_clears_on_return(
    mesh: Mesh, registry: Registry, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str],
) -> None:
    await mesh.put_routes(OPEN_TABLE)
    b_conf = await payments_host(mesh, nursery)
    upstream = free_port("127.0.0.1")
    a_conf = mesh.host_config("host-a", HOST_A, web(upstream))
    await start_daemon(nursery, a_conf)
    http, url = mesh.http, f"http://127.0.0.1:{upstream}/pay"
    assert await status_of(http, url) == 200
    assert (await state_of(http, a_conf))["registry"]["stale"] is False

    # the registry hangs: it accepts connections (the kernel does) and never answers
    assert registry.process is not None
    registry.process.send_signal(signal.SIGSTOP)
    hung_at = time.monotonic()

    async def stale() -> bool:
        return bool((await state_of(http, a_conf))["registry"]["stale"])
    await wait_for(stale, 30)
    reported_after = time.monotonic() - hung_at
    state = await state_of(http, a_conf)
    assert "did not answer" in state["registry"]["contact_error"]
    assert all(w["stale"] for w in state["registry"]["watches"])
    # still serving the last known state meanwhile
    assert [await status_of(http, url) for _ in range(10)] == [200] * 10
    with capsys.disabled():
        print(f"\nhung registry reported stale after {reported_after:.2f}s")
    assert reported_after < 5.0

    # it answers again: the watches resync at once (not after their 60 s long poll)
    registry.process.send_signal(signal.SIGCONT)
    back_at = time.monotonic()

    async def current() -> bool:
        reg = (await state_of(http, a_conf))["registry"]
        return reg["stale"] is False and all(not w["error"] for w in reg["watches"])
    await wait_for(current, 20)
    with capsys.disabled():
        print(f"registry back: staleness cleared after {time.monotonic() - back_at:.2f}s")
    assert b_conf.inbound_port  # (host-b served all along)


async def test_disk_state_of_another_trust_domain_or_badly_signed_is_not_used(
    mesh: Mesh, registry: Registry, nursery: trio.Nursery,
) -> None:
    """Fail closed: a routes.json whose signature no longer verifies is not put in force, and
    endpoints kept for another trust domain are not served: the meshd waits for the registry
    (not ready, the upstream unserved) rather than trust them."""
    await mesh.put_routes(OPEN_TABLE)
    await payments_host(mesh, nursery)
    upstream = free_port("127.0.0.1")
    a_conf = mesh.host_config("host-a", HOST_A, web(upstream))
    kept = a_conf.state_dir / ENDPOINTS_FILE
    async with trio.open_nursery() as first_run:  # (ends when that daemon has ended)
        first = await start_daemon(first_run, a_conf)
        await wait_for(lambda: _true(kept.exists()))
        await first.stop()
    await registry.stop()

    # a table altered on disk after signing, and endpoints of another mesh
    routes = a_conf.state_dir / ROUTES_FILE
    envelope = json.loads(routes.read_bytes())
    envelope["signature"] = envelope["signature"][:-8] + "AAAAAAA="
    routes.write_text(json.dumps(envelope))
    endpoints = json.loads(kept.read_bytes())
    endpoints["trust_domain"] = "other.mesh"
    kept.write_text(json.dumps(endpoints))

    daemon = Daemon(a_conf)
    nursery.start_soon(daemon.run)
    admin = f"http://{a_conf.admin_host}:{a_conf.admin_port}"
    await wait_for(lambda: _is(status_of(mesh.http, f"{admin}/readyz"), 503), 20)
    with trio.move_on_after(3):
        await daemon.ready_event.wait()
    assert not daemon.ready_event.is_set()
    state = (await mesh.http.get(f"{admin}/v1/state")).json()
    assert state["routes_source"] == "none" and state["routes"]["destinations"] == {}
    assert "payments" not in state["destinations"]
    assert state["registry"]["stale"] is True
    assert await status_of(mesh.http, f"http://127.0.0.1:{upstream}/pay") is None  # no listener
    await daemon.stop()


async def _true(value: bool) -> bool:
    return value


def test_endpoints_file_round_trip_and_refusals() -> None:
    from meshd.daemon.last_known import LastKnownError, decode_endpoints, encode_endpoints
    from meshd.registry.model import Endpoint, EndpointSet

    eps = (Endpoint("payments", "payments-host-b", "host-b", HOST_B, 20001, "v1", True,
                    (("region", "eu"), ("zone", "eu-1"))),
           Endpoint("payments", "payments-host-c", "host-c", "127.0.21.4", 20002, "v2", False))
    raw = encode_endpoints(TD, {"payments": EndpointSet("payments", eps, 42, 0.0)}, 1000.5)
    known = decode_endpoints(raw, TD)
    assert known.saved_at == 1000.5 and known.destinations == {"payments": (42, eps)}
    with pytest.raises(LastKnownError, match=r"trust domain 'lastknown\.mesh'"):
        decode_endpoints(raw, "other.mesh")
    for bad, reason in [(b"{", "not JSON"), (b"[]", "not a meshd-endpoints/1"),
                        (raw.replace(b"20001", b"70000"), "bad address or port"),
                        (raw.replace(b'"labels": {}', b'"labels": []'), "bad labels")]:
        with pytest.raises(LastKnownError, match=reason):
            decode_endpoints(bad, TD)


def test_staleness_runs_from_the_last_contact() -> None:
    """A long poll open on a registry that answers the heartbeat is current as of the last
    contact; without contact for STALE_AFTER it is stale, counted from that contact; a view
    from disk is stale from the start, counted from when it was saved."""
    from meshd.registry.watch import STALE_AFTER, RegistryContact, WatchStatus

    contact = RegistryContact()
    watch = WatchStatus("endpoints/payments", created=0.0)
    watch.succeeded(10.0, 7)  # the long poll's first answer; then it stays open
    contact.answered(69.0)
    assert not watch.stale(70.0, contact.last_contact)
    assert watch.staleness(70.0, contact.last_contact) == 0.0
    assert contact.failed(70.0, "no answer") and not contact.failed(71.0, "no answer")
    assert not watch.stale(69.0 + STALE_AFTER, contact.last_contact)
    assert watch.staleness(74.0, contact.last_contact) == pytest.approx(5.0)  # since 69
    assert contact.answered(75.0) and not contact.answered(76.0)
    assert watch.staleness(76.0, contact.last_contact) == 0.0

    from_disk = WatchStatus("routes", created=100.0)
    from_disk.loaded_from_disk(known_at=40.0, index=0)
    assert from_disk.stale(100.5, 100.4) and from_disk.staleness(100.5, 100.4) == 60.5
    from_disk.succeeded(101.0, 9)
    assert not from_disk.stale(101.5, 101.2) and from_disk.source == "registry"


async def test_endpoint_writes_are_coalesced(tmp_path: Path) -> None:
    """A view flapping hundreds of times costs one write a second at most, and the file ends
    with the last view."""
    from meshd.daemon.last_known import MIN_WRITE_INTERVAL, EndpointKeeper, decode_endpoints
    from meshd.registry.model import Endpoint, EndpointSet

    views: dict[str, EndpointSet] = {}
    keeper = EndpointKeeper(tmp_path / ENDPOINTS_FILE, TD, lambda: views, time.time)
    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        for n in range(200):
            healthy = n % 2 == 0
            views["payments"] = EndpointSet("payments", (Endpoint(
                "payments", "p", "host-b", HOST_B, 20001, "v1", healthy),), n, 0.0)
            keeper.changed()
            await trio.sleep(0.002)
        nursery.cancel_scope.cancel()  # (a pending change is written on the way out)
    elapsed = trio.current_time() - began
    assert 1 <= keeper.writes <= 2 + elapsed / MIN_WRITE_INTERVAL
    known = decode_endpoints((tmp_path / ENDPOINTS_FILE).read_bytes(), TD)
    assert known.destinations["payments"][0] == 199
