"""Helpers for the operations tests: a stand-in for systemd's end of the notification socket, and
meshd child processes run under the parts of their unit's sandbox a process can apply itself.

``NotifySocket`` binds the ``AF_UNIX`` datagram socket systemd would (in the abstract namespace,
so no path length limit and nothing to clean up), asks the kernel for each sender's credentials
(``SO_PASSCRED``, as systemd does to enforce ``NotifyAccess=main``) and records every datagram.

``meshd_command`` runs ``python -m meshd ...`` through ``hardened_exec.py`` with the unit's own
``RestrictAddressFamilies=`` (plus ``NoNewPrivileges`` and ``MemoryDenyWriteExecute``), so every
daemon these tests start shows it works inside those rules.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
import trio
from test_daemon import HOST_B, TD, Mesh

HERE = Path(__file__).resolve().parent
UNITS_DIR = HERE.parents[1] / "systemd"
HARDENED_EXEC = HERE / "hardened_exec.py"
WAIT_LIMIT = 30.0


def unit_settings(unit: str) -> dict[str, list[str]]:
    """``KEY=VALUE`` lines of a unit file, every value of each key in order."""
    settings: dict[str, list[str]] = {}
    for line in (UNITS_DIR / unit).read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def hardened(unit: str, command: list[str]) -> list[str]:
    """``command`` under ``unit``'s address families, NoNewPrivileges and W^X memory."""
    families = unit_settings(unit)["RestrictAddressFamilies"][-1]
    return [sys.executable, str(HARDENED_EXEC), families, *command]


def meshd_command(unit: str, *args: str) -> list[str]:
    return hardened(unit, [sys.executable, "-m", "meshd", *args])


@dataclass
class Notification:
    pid: int
    fields: dict[str, str]
    raw: bytes


@dataclass
class NotifySocket:
    name: str = field(default_factory=lambda: f"@meshd-test-{os.getpid()}-"
                      f"{secrets.token_hex(6)}")
    received: list[Notification] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    async def bind(self) -> NotifySocket:
        await self.sock.bind("\0" + self.name[1:])
        return self

    def close(self) -> None:
        self.sock.close()

    def environ(self, watchdog_usec: int | None = None) -> dict[str, str]:
        """The environment a unit's process gets (plus the caller's own)."""
        env = dict(os.environ, NOTIFY_SOCKET=self.name)
        env.pop("WATCHDOG_PID", None)
        env.pop("WATCHDOG_USEC", None)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    async def receive(self) -> Notification:
        creds_size = struct.calcsize("3i")
        data, ancdata, _flags, _addr = await self.sock.recvmsg(
            4096, socket.CMSG_SPACE(creds_size))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("3i", payload[:creds_size])
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
        message = Notification(pid, fields, data)
        self.received.append(message)
        return message

    async def wait_for(self, key: str, value: str | None = None) -> Notification:
        """The next datagram carrying ``key`` (with ``value``, if given), within
        ``WAIT_LIMIT`` seconds (callers bound it tighter with ``fail_after``)."""
        with trio.fail_after(WAIT_LIMIT):
            while True:
                message = await self.receive()
                if key in message.fields and value in (None, message.fields[key]):
                    return message

    def statuses(self) -> list[str]:
        return [m.fields["STATUS"] for m in self.received if "STATUS" in m.fields]

    def count(self, key: str) -> int:
        return sum(1 for m in self.received if key in m.fields)


@asynccontextmanager
async def child(unit: str, args: list[str], env: dict[str, str],
                log: Path) -> AsyncIterator[trio.Process]:
    """``meshd ARGS`` as a child process in ``unit``'s sandbox (as far as ``hardened`` goes),
    its output in ``log``; killed if the test fails."""
    with log.open("wb") as out:
        proc = await trio.lowlevel.open_process(meshd_command(unit, *args), env=env,
                                                stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def write_host_toml(mesh: Mesh, path: Path, conf_ports: dict[str, int], app_port: int,
                    *, interval: str = "5s", **overrides: Any) -> None:
    """A meshd.toml for host-b running payments (paths relative to the file)."""
    data: dict[str, Any] = {
        "node": "host-b", "address": HOST_B, "trust_domain": TD,
        "registry": mesh.registry_url, "state_dir": "state",
        "ca": {"url": mesh.ca_url, "fingerprint": mesh.fingerprint,
               "token_file": "join-token"},
        "inbound": {"port": conf_ports["inbound"]},
        "admin": {"address": f"{HOST_B}:{conf_ports['admin']}"},
        "services": [{"name": "payments", "port": app_port, "address": HOST_B,
                      "version": "v1", "health": {"http": "/healthz", "interval": interval}}],
    }
    data.update(overrides)
    path.write_text(tomlkit.dumps(data))
