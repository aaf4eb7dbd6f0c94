"""The write-ahead log with real files: every write acknowledged under concurrent writers and
compactions is on disk when the registry stops without warning; a log whose tail was cut is
recovered with a message that says exactly what was dropped and that it may have been
acknowledged."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from net_testing import free_port
from registry_testing import start_registry

pytestmark = pytest.mark.embedded_only("reads and cuts the embedded registry's own log file")

WRITERS, WRITES_EACH = 4, 25


async def test_every_write_acknowledged_across_concurrent_writers_and_compactions_is_kept(
    tmp_path: Path,
) -> None:
    acknowledged: dict[str, bytes] = {}
    async with trio.open_nursery() as nursery:
        # a log compacted every few writes, so writes queue behind compactions
        reg = await start_registry(nursery, data_dir=tmp_path, compact_bytes=3000)
        async with reg.client as client:

            async def writer(w: int) -> None:
                for i in range(WRITES_EACH):
                    key, value = f"w{w}/k{i:02d}", os.urandom(8).hex().encode() * 20
                    r = await client.put(f"/v1/kv/{key}", content=value)
                    assert r.status_code == 200 and r.json() is True
                    acknowledged[key] = value

            with trio.fail_after(60):
                async with trio.open_nursery() as writers:
                    for w in range(WRITERS):
                        writers.start_soon(writer, w)
            last = int((await client.get("/v1/kv/?recurse")).headers["X-Consul-Index"])
        nursery.cancel_scope.cancel()  # no clean shutdown: nothing is flushed on the way out
    assert (tmp_path / "snapshot.json").exists()  # compactions happened meanwhile
    assert len(acknowledged) == WRITERS * WRITES_EACH

    async with trio.open_nursery() as nursery:
        reg = await start_registry(nursery, data_dir=tmp_path)
        async with reg.client as client:
            r = await client.get("/v1/kv/?recurse")
            stored = {e["Key"]: e["Value"] for e in r.json()}
            assert int(r.headers["X-Consul-Index"]) == last
        nursery.cancel_scope.cancel()
    assert {k: base64.b64decode(v) for k, v in stored.items()} == acknowledged


def _spawn(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "meshd", "registry", "serve", "--http",
             f"127.0.0.1:{port}", "--data-dir", str(data_dir)],
            stdout=out, stderr=subprocess.STDOUT)


def _wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, "registry exited"
        try:
            client.get("/v1/status/leader")
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("registry did not start")


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cut_tail_scenario(tmp_path: Path) -> None:
    data, log, port = tmp_path / "data", tmp_path / "registry.log", free_port()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False) as http:
        proc = _spawn(data, port, log)
        try:
            _wait_ready(http, proc)
            for key in ("first", "second", "third"):
                assert http.put(f"/v1/kv/{key}", content=key.encode()).json() is True
        finally:
            _stop(proc, signal.SIGKILL)

        # something outside the registry cuts the log in the middle of its last record: the
        # acknowledged write of "third"
        wal = data / "wal.log"
        raw = wal.read_bytes()
        records = raw.split(b"\n")[:-1]
        last, kept = json.loads(records[-1][9:]), json.loads(records[-2][9:])
        assert [op[1] for op in last["ops"]] == ["third"]
        offset = len(raw) - len(records[-1]) - 1
        os.truncate(wal, offset + 30)

        proc = _spawn(data, port, log)
        try:
            _wait_ready(http, proc)
            assert http.get("/v1/kv/second").status_code == 200
            assert http.get("/v1/kv/third").status_code == 404  # what the message says is lost
        finally:
            _stop(proc, signal.SIGTERM)
    text = log.read_text()
    assert (f"dropped an incomplete last record (30 bytes at offset {offset}, carrying index "
            f"{last['index']}); the data now ends at index {kept['index']}") in text, text
    # both possibilities, each with its condition: never "a write that was never acknowledged"
    assert "If the registry or its host crashed while writing it, that write was never" in text
    assert "If the file was cut by something else" in text and "may have been acknowledged" in text
    assert wal.stat().st_size == offset  # cut back to the last whole record


async def test_a_log_cut_outside_the_registry_is_reported_truthfully(tmp_path: Path) -> None:
    await trio.to_thread.run_sync(_cut_tail_scenario, tmp_path)
