"""Durability: restarts keep state and index; kill -9 after an acknowledged write loses nothing;
corrupt files stop the start-up with a clear error."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from net_testing import free_port
from registry_testing import start_registry

from meshd.errors import RegistryError
from meshd.registry.embedded.server import RegistryConfig, serve_registry

pytestmark = pytest.mark.embedded_only(
    "restarts, kill -9 and corrupts the embedded registry's own data directory")


async def _write_some_state(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/agent/service/register",
                         json={"Name": "web", "ID": "web-1", "Port": 80, "Tags": ["v1"],
                               "Check": {"TTL": "30s"}})
    assert r.status_code == 200
    await client.put("/v1/agent/check/pass/service:web-1?note=ok")
    assert (await client.put("/v1/kv/meshd/config/routes", content=b"{}")).json() is True
    await client.put("/v1/kv/doomed", content=b"x")
    await client.delete("/v1/kv/doomed")
    await client.put("/v1/catalog/register", json={
        "Node": "db-host", "Address": "10.0.0.9", "Service": {"Service": "db", "Port": 5432}})
    sid = (await client.put("/v1/session/create", json={"Name": "lock"})).json()["ID"]
    assert (await client.put(f"/v1/kv/leader?acquire={sid}", content=b"me")).json() is True


async def test_restart_keeps_state_and_index(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        reg = await start_registry(nursery, data_dir=tmp_path)
        async with reg.client as client:
            await _write_some_state(client)
            health_before = await client.get("/v1/health/service/web")
            kv_before = await client.get("/v1/kv/meshd/config/routes")
            prefix_before = await client.get("/v1/kv/?recurse")
            node_before = (await client.get("/v1/catalog/nodes")).json()
            sessions_before = await client.get("/v1/session/list")
            leader_before = (await client.get("/v1/kv/leader")).json()
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        reg = await start_registry(nursery, data_dir=tmp_path)
        async with reg.client as client:
            health_after = await client.get("/v1/health/service/web")
            assert health_after.json() == health_before.json()
            assert health_after.headers["X-Consul-Index"] == health_before.headers[
                "X-Consul-Index"]
            kv_after = await client.get("/v1/kv/meshd/config/routes")
            assert kv_after.json() == kv_before.json()
            assert (await client.get("/v1/kv/?recurse")).headers["X-Consul-Index"] == \
                prefix_before.headers["X-Consul-Index"]
            assert (await client.get("/v1/catalog/nodes")).json() == node_before
            assert len(node_before) == 2
            sessions_after = await client.get("/v1/session/list")
            assert sessions_after.json() == sessions_before.json() != []
            assert sessions_after.headers["X-Consul-Index"] == sessions_before.headers[
                "X-Consul-Index"]
            assert (await client.get("/v1/kv/leader")).json() == leader_before
            assert (await client.get("/v1/catalog/service/db")).json()[0]["Node"] == "db-host"
            # the next write continues from the old index
            await client.put("/v1/kv/next", content=b"1")
            [entry] = (await client.get("/v1/kv/next")).json()
            assert entry["ModifyIndex"] > int(kv_before.headers["X-Consul-Index"])
            # TTL timers restarted: still passing right after the restart
            checks = (await client.get("/v1/agent/checks")).json()
            assert checks["service:web-1"]["Status"] == "passing"
        nursery.cancel_scope.cancel()


async def test_compaction_keeps_everything(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        reg = await start_registry(nursery, data_dir=tmp_path, compact_bytes=8000)
        async with reg.client as client:
            for i in range(40):
                await client.put(f"/v1/kv/k{i:02d}", content=b"v" * 1000)
            await client.delete("/v1/kv/k00")
            last = (await client.get("/v1/kv/?recurse")).headers["X-Consul-Index"]
        nursery.cancel_scope.cancel()
    assert (tmp_path / "snapshot.json").exists()
    assert (tmp_path / "wal.log").stat().st_size < 8000
    async with trio.open_nursery() as nursery:
        reg = await start_registry(nursery, data_dir=tmp_path)
        async with reg.client as client:
            r = await client.get("/v1/kv/?recurse")
            assert len(r.json()) == 39 and r.headers["X-Consul-Index"] == last
            r = await client.get("/v1/kv/k00?recurse")  # the tombstone survived compaction
            assert r.status_code == 404 and r.headers["X-Consul-Index"] == last
        nursery.cancel_scope.cancel()


async def test_corrupt_log_is_reported_not_emptied(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        reg = await start_registry(nursery, data_dir=tmp_path)
        async with reg.client as client:
            await _write_some_state(client)
        nursery.cancel_scope.cancel()
    wal = tmp_path / "wal.log"
    lines = wal.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"web", b"wob", 1)
    wal.write_bytes(b"\n".join(lines))
    size = wal.stat().st_size
    with pytest.raises(RegistryError) as info:
        await serve_registry(RegistryConfig(port=0, data_dir=tmp_path))
    assert str(wal) in str(info.value) and "line 2: checksum mismatch" in str(info.value)
    assert wal.stat().st_size == size


async def test_torn_last_record_is_dropped(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        reg = await start_registry(nursery, data_dir=tmp_path)
        async with reg.client as client:
            await client.put("/v1/kv/a", content=b"1")
        nursery.cancel_scope.cancel()
    wal = tmp_path / "wal.log"
    torn = b'0badf00d {"index": 99, "op'  # a write that died before its newline
    await trio.Path(wal).write_bytes(await trio.Path(wal).read_bytes() + torn)
    async with trio.open_nursery() as nursery:
        reg = await start_registry(nursery, data_dir=tmp_path)
        async with reg.client as client:
            assert (await client.get("/v1/kv/a")).status_code == 200
            assert (await client.put("/v1/kv/b", content=b"2")).json() is True
        nursery.cancel_scope.cancel()
    assert wal.read_bytes().endswith(b"\n")


def _spawn(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshd", "registry", "serve", "--http", f"127.0.0.1:{port}",
         "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        try:
            client.get("/v1/status/leader")
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("registry did not start")


def _kill9_scenario(tmp_path: Path) -> None:
    port = free_port()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        proc = _spawn(tmp_path, port)
        try:
            _wait_ready(client, proc)
            client.put("/v1/agent/service/register",
                       json={"Name": "web", "ID": "web-1", "Port": 80})
            assert client.put("/v1/kv/acked", content=b"yes").json() is True
            index = client.get("/v1/kv/acked").headers["X-Consul-Index"]
            os.kill(proc.pid, signal.SIGKILL)  # right after the acknowledged write
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        proc = _spawn(tmp_path, port)
        try:
            _wait_ready(client, proc)
            r = client.get("/v1/kv/acked")
            assert r.status_code == 200 and r.json()[0]["Value"] == "eWVz"
            assert r.headers["X-Consul-Index"] == index
            assert "web-1" in client.get("/v1/agent/services").json()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_kill_9_after_acknowledged_write(tmp_path: Path) -> None:
    await trio.to_thread.run_sync(_kill9_scenario, tmp_path)


def _run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "meshd", "registry", "serve", *args],
                          capture_output=True, timeout=20)


async def test_cli_reports_corrupt_snapshot_and_busy_port(tmp_path: Path) -> None:
    (tmp_path / "snapshot.json").write_bytes(b"garbage\n")
    port = free_port()
    result = await trio.to_thread.run_sync(
        _run_cli, "--http", f"127.0.0.1:{port}", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    err = result.stderr.decode()
    assert f"corrupt registry data file {tmp_path / 'snapshot.json'}" in err
    assert (tmp_path / "snapshot.json").read_bytes() == b"garbage\n"

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = await trio.to_thread.run_sync(_run_cli, "--http", f"127.0.0.1:{taken}")
    assert result.returncode == 1
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last.startswith(f"meshd: cannot listen on 127.0.0.1:{taken}: ")
