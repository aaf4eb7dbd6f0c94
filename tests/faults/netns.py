"""Hosts as Linux network namespaces joined by a bridge that itself lives in a namespace.

Nothing is added to the root namespace: ``<prefix>-br`` holds the bridge ``br0``; each host
``<prefix>-<host>`` holds ``eth0`` (its address in ``SUBNET``) and ``lo``, and the other end of its
veth pair is enslaved to the bridge inside ``<prefix>-br`` (created there directly, so no interface
ever appears in the root namespace). Cutting a host's link is ``ip link set <its bridge port>
down`` inside the bridge namespace.

Processes run inside a host with ``ip netns exec``, each in a session of its own with its output
in a log file; ``Topology.destroy`` kills every process still in one of the namespaces (``ip netns
pids``), checks with psutil that none of the processes it started is alive, and deletes the
namespaces. ``sweep_stale`` removes namespaces a crashed earlier run left behind: their names carry
the pid of the test process that made them, and only those whose process is gone are touched.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

NAME_ROOT = "mft"        # namespace names: mft<pid>-<host>
SUBNET = "10.77.0"       # /24, only ever configured inside the namespaces
BRIDGE = "br"


def run(argv: Sequence[str], *, timeout: float = 30.0, check: bool = True,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None,
                            check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[-2000:]}")
    return result


def netns_usable() -> str | None:
    """None when namespaces can be made here, else why not (for a skip reason)."""
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    try:
        probe = f"{NAME_ROOT}{os.getpid()}-probe"
        made = run(["ip", "netns", "add", probe], check=False, timeout=10)
        if made.returncode != 0:
            return f"`ip netns add` fails here: {made.stderr.strip()}"
        run(["ip", "netns", "del", probe], check=False, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` is not usable: {exc}"
    return None


def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ns_pids(name: str) -> list[int]:
    out = run(["ip", "netns", "pids", name], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_ns_processes(name: str) -> list[str]:
    """SIGKILL every process in namespace ``name``; what was killed."""
    killed = []
    for pid in ns_pids(name):
        try:
            proc = psutil.Process(pid)
            killed.append(f"{pid} {shlex.join(proc.cmdline())}")
            proc.kill()
        except psutil.Error:
            continue
    return killed


def delete_namespace(name: str) -> None:
    kill_ns_processes(name)
    deadline = time.monotonic() + 5
    while ns_pids(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    run(["ip", "netns", "del", name], check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces of earlier runs whose test process is gone; their names."""
    swept = []
    for name in list_namespaces():
        match = re.fullmatch(rf"{NAME_ROOT}(\d+)-.+", name)
        if match is None or psutil.pid_exists(int(match.group(1))):
            continue
        delete_namespace(name)
        swept.append(name)
    return swept


@dataclass
class Proc:
    """A process started inside a namespace (restartable with the same argv)."""

    label: str
    ns: str
    argv: tuple[str, ...]
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    history: list[tuple[int, float]] = field(default_factory=list)  # (pid, create time)

    def start(self) -> Proc:
        assert not self.alive(), f"{self.label} is already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- start: ip netns exec {self.ns} {shlex.join(self.argv)}\n".encode())
            self.popen = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *self.argv], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, **self.env})
        try:
            self.history.append((self.popen.pid, psutil.Process(self.popen.pid).create_time()))
        except psutil.Error:
            pass
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def send(self, sig: signal.Signals) -> None:
        if self.alive():
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig`` to its process group, wait, SIGKILL after ``timeout``; its exit code."""
        if self.popen is None:
            return None
        self.send(sig)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            return self.popen.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    port: str   # its veth end in the bridge namespace

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


class Topology:
    def __init__(self, hosts: Mapping[str, int], log_dir: Path, tag: str = "") -> None:
        """``hosts``: name -> last octet of its address in ``SUBNET``; ``tag`` tells this
        topology's namespaces from another one's of the same test process."""
        self.prefix = f"{NAME_ROOT}{os.getpid()}" + (f"-{tag}" if tag else "")
        self.bridge_ns = f"{self.prefix}-{BRIDGE}"
        self.log_dir = log_dir
        self.hosts = {name: Host(name, f"{self.prefix}-{name}", f"{SUBNET}.{octet}",
                                 f"p{i}-{name}"[:15])
                      for i, (name, octet) in enumerate(hosts.items())}
        self.procs: list[Proc] = []
        self.created: list[str] = []

    def namespaces(self) -> list[str]:
        return [self.bridge_ns, *(h.ns for h in self.hosts.values())]

    def create(self) -> None:
        b = self.bridge_ns
        self._add_ns(b)
        run(["ip", "-n", b, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", b, "link", "set", "br0", "up"])
        run(["ip", "-n", b, "link", "set", "lo", "up"])
        for host in self.hosts.values():
            self._add_ns(host.ns)
            run(["ip", "-n", host.ns, "link", "add", "eth0", "type", "veth",
                 "peer", "name", host.port, "netns", b])
            run(["ip", "-n", b, "link", "set", host.port, "master", "br0"])
            run(["ip", "-n", b, "link", "set", host.port, "up"])
            run(["ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
            run(["ip", "-n", host.ns, "link", "set", "eth0", "up"])
            run(["ip", "-n", host.ns, "link", "set", "lo", "up"])

    def _add_ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.created.append(name)

    def set_link(self, host: str, up: bool) -> None:
        """Plug or unplug ``host``'s cable: its port on the bridge, in the bridge namespace."""
        run(["ip", "-n", self.bridge_ns, "link", "set", self.hosts[host].port,
             "up" if up else "down"])

    def spawn(self, label: str, host: str, argv: Sequence[str],
              env: Mapping[str, str] | None = None) -> Proc:
        proc = Proc(label, self.hosts[host].ns, tuple(argv),
                    self.log_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "-", label) + ".log"),
                    dict(env or {}))
        self.procs.append(proc)
        return proc.start()

    def exec(self, host: str, argv: Sequence[str], *, timeout: float = 30.0,
             check: bool = True, env: Mapping[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
        return run(self.hosts[host].argv(*argv), timeout=timeout, check=check,
                   env={**os.environ, **(env or {})})

    def destroy(self) -> list[str]:
        """Stop everything, delete the namespaces; problems found on the way (processes that
        had to be killed by the namespace sweep, or that survived it)."""
        problems: list[str] = []
        for proc in reversed(self.procs):
            proc.stop(signal.SIGKILL, timeout=5)
        for name in self.created:
            for line in kill_ns_processes(name):
                problems.append(f"left in {name}: {line}")
        survivors = []
        for proc in self.procs:
            for pid, created in proc.history:
                try:
                    p = psutil.Process(pid)
                    if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                        survivors.append(f"{proc.label}: pid {pid}")
                except psutil.Error:
                    continue
        problems += [f"still alive: {s}" for s in survivors]
        for name in reversed(self.created):
            delete_namespace(name)
        left = set(self.created) & set(list_namespaces())
        problems += [f"namespace not deleted: {n}" for n in sorted(left)]
        self.created.clear()
        return problems
