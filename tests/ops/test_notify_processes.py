"""The three daemons as real child processes under a stand-in for systemd: each gets
``NOTIFY_SOCKET`` (a datagram socket this test binds) and ``WATCHDOG_USEC``, and must send
``READY=1`` once it serves, ``STATUS=`` lines that say what it is doing, ``WATCHDOG=1`` at half
the watchdog interval, and ``STOPPING=1`` on SIGTERM before exiting 0, every datagram from its
own PID (``NotifyAccess=main``)."""

from __future__ import annotations

import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import trio
from ops_testing import NotifySocket, child, write_host_toml
from test_daemon import HOST_B, TD, Mesh, free_port, mesh, payments_app

from meshd.ca.store import init_ca

__all__ = ["mesh"]  # the fixture, imported for pytest

WATCHDOG_USEC = 600_000  # pings expected every 0.3 s


async def assert_pings_then_stops(listener: NotifySocket, proc: trio.Process, log: Path) -> None:
    """Watchdog pings closer together than the watchdog interval (systemd's deadline), then
    SIGTERM: STOPPING=1 and exit 0."""
    last = trio.current_time()
    for _ in range(3):
        with trio.fail_after(5):
            ping = await listener.wait_for("WATCHDOG", "1")
        assert ping.pid == proc.pid
        now = trio.current_time()
        assert now - last < WATCHDOG_USEC / 1e6, "a ping came later than the watchdog allows"
        last = now
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        stopping = await listener.wait_for("STOPPING", "1")
    assert stopping.pid == proc.pid
    with trio.fail_after(20):
        code = await proc.wait()
    assert code == 0, await trio.Path(log).read_text()
    assert all(m.pid == proc.pid for m in listener.received)


async def test_registry_serve_notifies(listener: NotifySocket, tmp_path: Path) -> None:
    args = ["registry", "serve", "--http", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")]
    log = tmp_path / "registry.log"
    async with child("meshd-registry.service", args, listener.environ(WATCHDOG_USEC), log) as proc:
        ready = await listener.wait_for("READY", "1")
        assert ready.pid == proc.pid
        assert ready.fields["STATUS"].startswith("serving the Consul HTTP API on 127.0.0.1:")
        await assert_pings_then_stops(listener, proc, log)


async def test_ca_serve_notifies(listener: NotifySocket, tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", TD, now=datetime.now(UTC))
    # a wildcard address, as on a CA host: the CA then lists the interface addresses for its
    # certificate, which needs netlink (in the unit's RestrictAddressFamilies= for that reason)
    args = ["ca", "serve", "--dir", str(tmp_path / "ca"), "--listen", "0.0.0.0:0"]
    log = tmp_path / "ca.log"
    async with child("meshd-ca.service", args, listener.environ(WATCHDOG_USEC), log) as proc:
        ready = await listener.wait_for("READY", "1")
        assert ready.fields["STATUS"].startswith("serving the CA API on https://0.0.0.0:")
        await assert_pings_then_stops(listener, proc, log)


async def test_meshd_run_notifies_and_status_reports(
    mesh: Mesh, nursery: trio.Nursery, listener: NotifySocket,
) -> None:
    app_port = free_port(HOST_B)
    await nursery.start(payments_app, HOST_B, app_port, "v1")
    conf = mesh.host_config("host-b", HOST_B, [{"name": "payments", "port": app_port}])
    toml = conf.ca.token_file.parent / "meshd.toml"
    write_host_toml(mesh, toml, {"inbound": conf.inbound_port, "admin": conf.admin_port},
                    app_port)
    log = toml.parent / "meshd.log"
    async with child("meshd.service", ["run", "--config", str(toml)],
                     listener.environ(WATCHDOG_USEC), log) as proc:
        ready = await listener.wait_for("READY", "1")
        assert ready.pid == proc.pid
        # generation 0: the registry holds no route table, so none is in force (fail closed:
        # a missing key is never applied as an empty table)
        assert ready.fields["STATUS"] == "ready: 1 service, 0 upstreams, generation 0"
        before = listener.statuses()[:-1]
        assert before == [f"getting certificates from the CA at {mesh.ca_url}",
                          f"reading routes and endpoints from {mesh.registry_url}",
                          "registering 1 service(s)"], before

        # what an operator types next: meshd status, exit 0 while ready
        admin = f"{conf.admin_host}:{conf.admin_port}"
        result = await trio.run_process(
            [sys.executable, "-m", "meshd", "status", "--admin", admin],
            capture_stdout=True, capture_stderr=True, check=False)
        text = result.stdout.decode()
        assert result.returncode == 0, text + result.stderr.decode()
        assert text.startswith(f"meshd host-b ({HOST_B}), trust domain {TD}: READY")
        assert "payments" in text and "passing" in text
        assert f"spiffe://{TD}/svc/payments" in text

        await assert_pings_then_stops(listener, proc, log)
    assert "deregistered payments-host-b" in await trio.Path(log).read_text()
