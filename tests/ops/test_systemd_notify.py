"""meshd.systemd: the message format and environment parsing (pure), then ``notify`` and the
watchdog over real datagram sockets, in this process."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest
import trio
from ops_testing import NotifySocket

from meshd import systemd


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({}, b""),
    ({"ready": True}, b"READY=1"),
    ({"ready": True, "status": "ready: 1 service"}, b"READY=1\nSTATUS=ready: 1 service"),
    ({"stopping": True, "status": "stopping"}, b"STOPPING=1\nSTATUS=stopping"),
    ({"watchdog": True}, b"WATCHDOG=1"),
    ({"reloading": True, "monotonic_usec": 42}, b"RELOADING=1\nMONOTONIC_USEC=42"),
    # a status is one line: a newline in it would start another assignment
    ({"status": "line one\nREADY=1"}, b"STATUS=line one READY=1"),
    ({"status": "caf\u00e9"}, "STATUS=caf\u00e9".encode()),
])
def test_format_message(kwargs: dict[str, object], expected: bytes) -> None:
    assert systemd.format_message(**kwargs) == expected  # type: ignore[arg-type]


def test_long_status_is_cut_not_split() -> None:
    message = systemd.format_message(status="x" * 2000)
    assert message == b"STATUS=" + b"x" * systemd.MAX_STATUS


@pytest.mark.parametrize(("value", "expected"), [
    (None, None),
    ("", None),
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@/org/freedesktop/systemd1/notify/123", "\0/org/freedesktop/systemd1/notify/123"),
    ("@", None),
    ("vsock:2:1234", None),
    ("relative/path", None),
])
def test_notify_address(value: str | None, expected: str | None) -> None:
    environ = {} if value is None else {"NOTIFY_SOCKET": value}
    assert systemd.notify_address(environ) == expected


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "77"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "78"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(environ, pid=77) == expected


def test_notify_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify(ready=True) is False


def test_notify_to_a_missing_socket_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/meshd-notify.sock")
    assert systemd.notify(ready=True, status="x") is False


def test_notify_over_a_filesystem_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    # a short directory: AF_UNIX paths are limited to 107 bytes
    with tempfile.TemporaryDirectory(dir="/tmp") as directory, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        path = str(Path(directory) / "notify")
        receiver.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.notify(ready=True, status="ready: 2 services")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=ready: 2 services"


async def test_notify_over_an_abstract_socket_carries_our_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    listener = await NotifySocket().bind()
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
        assert systemd.notify(stopping=True)
        with trio.fail_after(5):
            message = await listener.wait_for("STOPPING", "1")
        assert message.pid == os.getpid()
        assert systemd.notify(reloading=True)
        with trio.fail_after(5):
            message = await listener.wait_for("RELOADING", "1")
        assert int(message.fields["MONOTONIC_USEC"]) > 0
    finally:
        listener.close()


async def test_watchdog_pings_at_half_the_interval(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock,
) -> None:
    sent: list[bool] = []

    def record(**kwargs: bool) -> bool:
        sent.append(kwargs["watchdog"])
        return True

    monkeypatch.setattr(systemd, "notify", record)
    async with trio.open_nursery() as nursery:
        await nursery.start(systemd.watchdog_task, 10.0)
        await trio.sleep(22.0)  # pings at 0, 5, 10, 15, 20
        nursery.cancel_scope.cancel()
    assert sent == [True] * 5


async def test_no_watchdog_configured_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with trio.fail_after(1):
        await systemd.watchdog_task()
