"""A meshd restarts or is upgraded in place under a steady 50 req/s, and no request fails: the
listening sockets outlive the process (held by the test as systemd's fd store holds them, or
handed over by the running meshd to its successor), and a stop drains with the configured
deadline. Real `meshd run` child processes, the embedded registry and the CA, a real app; each
test prints its failed/total and the restart window."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from mesh_testing import Mesh, open_mesh, wait_for
from net_testing import free_port
from restart_testing import (
    HOST_A,
    HOST_B,
    HeldSockets,
    LoadResult,
    Meshd,
    Processes,
    listening_line,
    processes,
    steady_load,
    write_toml,
)

import meshd
from meshd.config.load import load_host_config
from meshd.config.parse import routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable
from meshd.daemon import handover

TD = "restart.mesh"
LOAD_REQUESTS = 300  # 6 s at 50 req/s
RESTART_AFTER = 1.5  # seconds into the load


async def transfer_app(address: str, port: int,
                       *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """payments: ``/pay`` answers at once; ``/download?seconds=S`` streams 100 KB over S
    seconds (a long transfer); ``/healthz`` says ok."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await answer(stream)
        except trio.BrokenResourceError:
            pass  # a transfer cut by its caller

    async def answer(stream: trio.SocketStream) -> None:
        data = b""
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
        target = data.split(b" ", 2)[1].decode()
        if target.startswith("/download"):
            seconds = float(target.partition("seconds=")[2])
            chunks = 50
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                  % (chunks * 2048))
            for _ in range(chunks):
                await trio.sleep(seconds / chunks)
                await stream.send_all(b"x" * 2048)
        else:
            body = b'{"service": "payments"}'
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                  % (len(body), body))
        await stream.aclose()

    await trio.serve_tcp(handle, port, host=address, task_status=task_status)


@dataclass
class Hosts:
    mesh: Mesh
    a_toml: Path
    b_toml: Path
    url: str  # /pay through host-a's outbound listener
    procs: Processes

    def admin(self, toml: Path) -> str:
        conf = load_host_config(toml)
        return f"http://{conf.admin_host}:{conf.admin_port}"

    async def start(self, toml: Path, tag: str, **kw: Any) -> Meshd:
        return await self.procs.meshd(toml, toml.parent / f"meshd-{tag}.log", **kw)

    async def serving(self) -> None:
        async def answered() -> bool:
            try:
                return (await self.mesh.http.get(self.url)).status_code == 200
            except httpx.HTTPError:
                return False
        await wait_for(answered, 30)


@pytest.fixture
async def hosts(nursery: trio.Nursery, tmp_path: Path, request: pytest.FixtureRequest
                ) -> AsyncIterator[Hosts]:
    drain = getattr(request, "param", None)
    async with httpx.AsyncClient(timeout=10) as http, processes() as procs:
        mesh = await open_mesh(nursery, tmp_path, http, TD)
        app_port = free_port(HOST_B)
        await nursery.start(transfer_app, HOST_B, app_port)
        open_table = routes_to_data(RouteTable(default_policy=DefaultPolicy.ALLOW))
        await mesh.put_routes(open_table | {"destinations": {"payments": {
            "subsets": {"v1": {"version": "v1"}}, "split": {"v1": 100}, "timeout": 30.0}}})
        upstream_port = free_port("127.0.0.1")
        b_toml = write_toml(mesh, "host-b", HOST_B, [{
            "name": "payments", "port": app_port, "address": HOST_B, "version": "v1",
            "health": {"tcp": True, "interval": "500ms"}}])
        a_toml = write_toml(mesh, "host-a", HOST_A, [{
            "name": "web", "port": free_port(HOST_A), "health": {"none": True},
            "upstreams": [{"name": "payments", "local_port": upstream_port}]}],
            **({"drain_timeout": drain} if drain else {}))
        yield Hosts(mesh, a_toml, b_toml, f"http://127.0.0.1:{upstream_port}/pay", procs)


async def test_sigterm_then_a_new_meshd_on_the_same_sockets_refuses_nothing(
        hosts: Hosts, nursery: trio.Nursery) -> None:
    """systemd-style: the test binds host-a's sockets (inbound, outbound, admin) and passes
    them with LISTEN_FDS; the first meshd is stopped with SIGTERM and, once it has exited (as
    systemd waits), a second one starts on the same sockets. Requests sent meanwhile wait in
    the kernel's queue."""
    held = HeldSockets(hosts.a_toml)
    try:
        await hosts.start(hosts.b_toml, "b")
        first = await hosts.start(hosts.a_toml, "a1", held=held)
        await first.wait_for("meshd host-a ready")
        assert "with the socket inherited through LISTEN_FDS" in first.text()
        await hosts.serving()

        result = LoadResult()
        async with trio.open_nursery() as load:
            await load.start(steady_load, hosts.url, LOAD_REQUESTS, result)
            await trio.sleep(RESTART_AFTER)
            sigterm = trio.current_time()
            first.process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                code = await first.process.wait()
            exited = trio.current_time()
            second = await hosts.start(hosts.a_toml, "a2", held=held)
            accepting = await second.wait_for(listening_line("web", "payments"))
        print(f"\nsystemd-style restart of the caller's meshd: {result.summary()}; SIGTERM to "
              f"exit {exited - sigterm:.2f}s, restart window (SIGTERM until the new process "
              f"accepts) {accepting - sigterm:.2f}s")
        assert code == 0, first.text()[-3000:]
        assert not result.failed and result.total == LOAD_REQUESTS, result.summary()
        assert "matches no listener" not in second.text()
        # the new process answers on the admin socket it inherited, and served requests
        metrics = (await hosts.mesh.http.get(f"{hosts.admin(hosts.a_toml)}/metrics")).text
        assert 'meshd_requests_total{code="200",destination="payments"' in metrics
    finally:
        held.close()


def _new_code(tmp: Path) -> tuple[Path, str]:
    """A copy of the package tree with its own version: "new code, same config"."""
    root = tmp / "new-code"
    shutil.copytree(Path(meshd.__file__).parent, root / "meshd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    version = f"{meshd.__version__}+upgrade"
    init = root / "meshd" / "__init__.py"
    init.write_text(init.read_text().replace(f'"{meshd.__version__}"', f'"{version}"'))
    return root, version


@pytest.mark.parametrize("node", ["host-a", "host-b"])
async def test_in_place_upgrade_hands_the_sockets_over_and_loses_nothing(
        hosts: Hosts, node: str, tmp_path: Path) -> None:
    """`meshd run` from new code with the same config, next to the running one (no systemd,
    no held sockets): it takes the listening sockets over handover.sock, becomes ready, and
    the old one drains and exits without deregistering. For the caller's meshd (host-a: the
    app's outbound listener) and the callee's (host-b: the inbound mTLS listener)."""
    await hosts.start(hosts.b_toml, "b1") if node == "host-a" else None
    old_a = await hosts.start(hosts.a_toml, "a1")
    old_b = await hosts.start(hosts.b_toml, "b1") if node == "host-b" else None
    old = old_a if node == "host-a" else old_b
    assert old is not None
    await old.wait_for(f"meshd {node} ready")
    await hosts.serving()
    toml = hosts.a_toml if node == "host-a" else hosts.b_toml
    code_root, version = _new_code(tmp_path)

    result = LoadResult()
    async with trio.open_nursery() as load:
        await load.start(steady_load, hosts.url, LOAD_REQUESTS, result)
        await trio.sleep(RESTART_AFTER)
        started = trio.current_time()
        # (run from there: `python -m` looks in its working directory first)
        new = await hosts.start(toml, "new", env={"PYTHONPATH": str(code_root)},
                                cwd=code_root)
        alone = await new.wait_for("this process serves alone now")
        with trio.fail_after(30):
            code = await old.process.wait()
        exited = trio.current_time()
    print(f"\nin-place upgrade of {node}'s meshd: {result.summary()}; new process start to "
          f"serving alone {alone - started:.2f}s, old one exited after {exited - started:.2f}s "
          "(both accept meanwhile: no window)")
    assert code == 0, old.text()[-3000:]
    assert not result.failed and result.total == LOAD_REQUESTS, result.summary()
    count = 3 if node == "host-a" else 2  # inbound, admin (and host-a's outbound listener)
    assert f"handover: gave {count} listening socket(s) to pid" in old.text()
    assert "deregistered" not in old.text()
    state = (await hosts.mesh.http.get(f"{hosts.admin(toml)}/v1/state")).json()
    assert state["version"] == version and state["ready"] is True
    # the entries stayed: the new process serves under the same IDs
    services = (await hosts.mesh.http.get(
        f"{hosts.mesh.registry_url}/v1/agent/services")).json()
    assert {"payments-host-b", "web-host-a"} <= set(services)
    # and the new one can be upgraded in turn (it serves handover.sock now)
    assert (toml.parent / "state" / "handover.sock").exists()


async def test_a_second_upgrade_at_once_is_refused(hosts: Hosts) -> None:
    """While a successor holds a handover open (the test, speaking the protocol itself), a
    second `meshd run` is refused with the first one's pid and exits 1; the old meshd serves
    on, and when the held handover is dropped it says so and still serves."""
    await hosts.start(hosts.b_toml, "b")
    old = await hosts.start(hosts.a_toml, "a1")
    await old.wait_for("meshd host-a ready")
    await hosts.serving()
    successor = await handover.take_over(load_host_config(hosts.a_toml))
    assert successor is not None and len(successor.sockets) == 3
    second = await hosts.start(hosts.a_toml, "a2")
    with trio.fail_after(30):
        assert await second.process.wait() == 1
    assert f"a handover to pid {os.getpid()} is under way" in second.text(), second.text()
    await hosts.serving()
    successor.close()
    await old.wait_for("abandoned before it was ready")
    await hosts.serving()
    assert old.process.returncode is None


async def test_an_upgrade_that_dies_before_ready_leaves_the_old_meshd_serving(
        hosts: Hosts) -> None:
    await hosts.start(hosts.b_toml, "b")
    old = await hosts.start(hosts.a_toml, "a1")
    await old.wait_for("meshd host-a ready")
    new = await hosts.start(hosts.a_toml, "a2")
    await new.wait_for("handover: received")
    new.process.kill()
    await old.wait_for("abandoned before it was ready")
    await hosts.serving()
    assert old.process.returncode is None
    # a stale socket file (its process killed) does not stop a later start
    old.process.kill()
    await old.process.wait()
    fresh = await hosts.start(hosts.a_toml, "a3")
    await fresh.wait_for("meshd host-a ready")
    assert "is stale (no meshd behind it)" in fresh.text()
    await hosts.serving()


@pytest.mark.parametrize(("hosts", "completes"), [("4s", True), ("1s", False)],
                         indirect=["hosts"])
async def test_a_long_transfer_gets_the_configured_drain_deadline(
        hosts: Hosts, completes: bool) -> None:
    """A 2.5 s download through host-a when SIGTERM arrives: with drain_timeout = "4s" it
    completes; with "1s" it is cut at the deadline."""
    await hosts.start(hosts.b_toml, "b")
    a = await hosts.start(hosts.a_toml, "a")
    await a.wait_for("meshd host-a ready")
    await hosts.serving()
    url = hosts.url.replace("/pay", "/download?seconds=2.5")
    got: list[int | str] = []

    async def download() -> None:
        try:
            async with hosts.mesh.http.stream("GET", url) as r:
                size = 0
                async for chunk in r.aiter_bytes():
                    size += len(chunk)
                got.append(size)
        except httpx.HTTPError as exc:
            got.append(f"{type(exc).__name__}: {exc}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(download)
        await trio.sleep(0.5)
        sigterm = trio.current_time()
        a.process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await a.process.wait()
        stopped = trio.current_time() - sigterm
    print(f"\ndrain_timeout {'4s' if completes else '1s'}: transfer "
          f"{'complete' if got == [102400] else got}, meshd exited {stopped:.2f}s after SIGTERM")
    if completes:
        assert got == [50 * 2048], got
        assert "drain deadline reached" not in a.text()
    else:
        assert got != [50 * 2048], got
        assert "drain deadline reached: cutting 1 connection(s)" in a.text()
