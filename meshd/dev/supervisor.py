"""The child processes of ``meshd up``: start, watch, restart with backoff, stop in order.

Every child runs in a session of its own, so a Ctrl-C typed in the terminal reaches only the runner,
which then stops the children in the right order instead of all of them dying at once. A child's
stdout and stderr share one pipe; a pump task copies it line by line to the child's log file and
to the console (which decides what the terminal shows), and keeps the last lines for error
messages. A child given an access log file (``ChildSpec.access_log``) has its access log lines
written there instead, and only counted on the console.

A child that exits while nobody asked it to is restarted after an exponential backoff, which
resets once a run has lasted ``stable_after`` seconds. A child given listening sockets
(``ChildSpec.listen_fds``, which the runner holds for the whole run) gets them as systemd passes
them (``LISTEN_FDS``, through ``listen_exec.py``) on every start, and is restarted almost at once:
connections queue on its sockets meanwhile, so the delay is what they wait.

``stop_all`` sends SIGTERM to each child's process group, one stop group at a time (the runner
puts the meshds first, so that they deregister while the registry still answers), SIGKILLs
whatever outlives the deadline, and a final sweep with psutil kills any descendant still alive,
including grandchildren orphaned on the way.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import BinaryIO

import psutil
import trio

from meshd.dev import childlog
from meshd.dev.console import Console
from meshd.errors import MeshError

TAIL_LINES = 40
MAX_LINE = 64 * 1024
DRAIN_TIMEOUT = 1.0   # after a child exits, how long its last output may take to arrive
LISTENING_RESTART_BASE = 0.05  # first restart delay of a child whose sockets are held for it
LISTEN_EXEC = Path(__file__).resolve().parent / "listen_exec.py"


@dataclass(frozen=True)
class ChildSpec:
    label: str                     # "registry", "meshd host-a", "web v1"
    argv: tuple[str, ...]
    log_path: Path
    stop_group: int = 0            # lower groups are stopped first
    cwd: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)   # added to the runner's environment
    # (name, descriptor) of listening sockets the runner holds: passed with LISTEN_FDS
    listen_fds: tuple[tuple[str, int], ...] = ()
    access_log: Path | None = None  # where its access log lines go (a meshd's), if anywhere

    def command(self) -> list[str]:
        """The argv to start: ``argv`` itself, or through the ``LISTEN_FDS`` shim."""
        if not self.listen_fds:
            return list(self.argv)
        fds = ",".join(str(fd) for _, fd in self.listen_fds)
        names = ":".join(name for name, _ in self.listen_fds)
        return [sys.executable, "-I", str(LISTEN_EXEC), fds, names, "--", *self.argv]


def restart_delay(failures: int, base: float = 0.5, cap: float = 10.0) -> float:
    """Seconds to wait before restarting a child that has failed ``failures`` times in a row."""
    return min(cap, base * 2.0 ** max(0, failures - 1))


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ChildState(Enum):
    RUNNING = "running"
    BACKOFF = "waiting to restart"
    STOPPED = "stopped"


class Child:
    """One supervised program across its restarts."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.process: trio.Process | None = None
        self.state = ChildState.RUNNING
        self.starts = 0
        self.started_at = 0.0
        self.exit_codes: list[int] = []
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.stop_requested = trio.Event()
        self.finished = trio.Event()
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: BinaryIO | None = spec.log_path.open("ab", buffering=0)
        self._access: BinaryIO | None = (spec.access_log.open("ab", buffering=0)
                                         if spec.access_log is not None else None)

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def tail_text(self, lines: int = 15) -> str:
        return "\n".join(list(self.tail)[-lines:])

    def log_line(self, raw: bytes) -> None:
        if self._log is not None:
            self._log.write(raw + b"\n")

    def access_line(self, raw: bytes) -> None:
        if self._access is not None:
            self._access.write(raw + b"\n")

    @property
    def keeps_access_log(self) -> bool:
        return self._access is not None

    def close_log(self) -> None:
        for log in (self._log, self._access):
            if log is not None:
                log.close()
        self._log = self._access = None


class Supervisor:
    def __init__(
        self, console: Console, *, backoff_base: float = 0.5, backoff_cap: float = 10.0,
        stable_after: float = 10.0, stop_timeout: float = 5.0, kill_timeout: float = 3.0,
        sweep_all_descendants: bool = False,
    ) -> None:
        self.console = console
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.stable_after = stable_after
        self.stop_timeout = stop_timeout
        self.kill_timeout = kill_timeout
        # True only in a process that owns all of its children (the `meshd up` runner): the
        # final sweep then kills every descendant, not only those this supervisor started
        self.sweep_all_descendants = sweep_all_descendants
        self.children: list[Child] = []
        self.left_behind: list[str] = []
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._hurry = trio.Event()
        self._known: set[tuple[int, float]] = set()   # (pid, create time) of all we have seen

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Supervisor]:
        """Supervise children within this block; leaving it (however) stops them all."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    yield self
                finally:
                    with trio.CancelScope(shield=True):
                        await self.stop_all()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                self.left_behind = await trio.to_thread.run_sync(self._sweep)
            for line in self.left_behind:
                self.console.error(f"killed a process left behind: {line}")
            for child in self.children:
                child.close_log()

    async def start(self, spec: ChildSpec) -> Child:
        """Start ``spec`` and keep it running. Raises MeshError when it cannot be started."""
        if self._nursery is None or self._closing:
            raise MeshError(f"cannot start {spec.label}: the supervisor is not running")
        try:
            child = Child(spec)
        except OSError as exc:
            raise MeshError(f"cannot open the log of {spec.label} ({spec.log_path}): "
                            f"{exc.strerror or exc}") from exc
        self.children.append(child)
        self.console.register(spec.label)
        try:
            process = await self._spawn(child)
        except MeshError:
            child.state = ChildState.STOPPED
            child.finished.set()
            raise
        self._nursery.start_soon(self._supervise, child, process)
        self.console.say(f"started {spec.label} (pid {process.pid})")
        return child

    def hurry(self) -> None:
        """Skip the rest of the graceful stop: SIGKILL what is still running."""
        self._hurry.set()

    async def stop_all(self) -> None:
        """SIGTERM each stop group in turn, wait up to ``stop_timeout``, SIGKILL leftovers."""
        self._closing = True
        live = [c.pid for c in self.children if c.pid is not None and not c.finished.is_set()]
        self._known |= await trio.to_thread.run_sync(_process_trees, live)
        for group in sorted({c.spec.stop_group for c in self.children}):
            members = [c for c in self.children
                       if c.spec.stop_group == group and not c.finished.is_set()]
            for child in members:
                child.stop_requested.set()
                self._signal(child, signal.SIGTERM)
            await self._wait_finished(members, self.stop_timeout)
            for child in members:
                if not child.finished.is_set():
                    if not self._hurry.is_set():
                        self.console.error(f"{child.label} did not stop within "
                                           f"{self.stop_timeout:g}s; killing it")
                    self._signal(child, signal.SIGKILL)
            await self._wait_finished(members, self.kill_timeout, hurry=False)

    # ----------------------------------------------------------------------------------------

    async def _spawn(self, child: Child) -> trio.Process:
        spec = child.spec
        try:
            process = await trio.lowlevel.open_process(
                spec.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, cwd=spec.cwd, env={**os.environ, **spec.env},
                start_new_session=True, pass_fds=[fd for _, fd in spec.listen_fds],
            )
        except OSError as exc:
            raise MeshError(f"cannot start {spec.label} ({shlex.join(spec.argv)}): "
                            f"{exc.strerror or exc}") from exc
        child.process = process
        child.state = ChildState.RUNNING
        child.starts += 1
        child.started_at = trio.current_time()
        self._known |= _process_trees([process.pid])
        child.log_line(f"--- meshd up: started pid {process.pid}: {shlex.join(spec.argv)}"
                       .encode())
        if child.stop_requested.is_set():   # a stop arrived while it was being spawned
            self._signal(child, signal.SIGTERM)
        return process

    async def _supervise(self, child: Child, process: trio.Process | None) -> None:
        failures = 0
        try:
            while True:
                if process is not None:
                    code = await self._watch(child, process)
                    child.exit_codes.append(code)
                    if child.stop_requested.is_set():
                        return
                    ran = trio.current_time() - child.started_at
                    if ran >= self.stable_after:
                        failures = 0
                    what = f"{child.label} exited ({describe_exit(code)}) after {ran:.1f}s"
                else:
                    what = f"{child.label} could not be started"
                failures += 1
                base = LISTENING_RESTART_BASE if child.spec.listen_fds else self.backoff_base
                delay = restart_delay(failures, base, self.backoff_cap)
                self.console.child_exited(child.label, f"{what}; restarting it in {delay:g}s",
                                          child.tail if process is not None else ())
                child.state = ChildState.BACKOFF
                with trio.move_on_after(delay):
                    await child.stop_requested.wait()
                if child.stop_requested.is_set():
                    return
                try:
                    process = await self._spawn(child)
                except MeshError as exc:
                    self.console.error(str(exc))
                    process = None
                else:
                    self.console.say(f"restarted {child.label} (pid {process.pid}, "
                                     f"start #{child.starts})")
        finally:
            child.state = ChildState.STOPPED
            child.finished.set()

    async def _watch(self, child: Child, process: trio.Process) -> int:
        """Copy the child's output until it exits; its exit code."""
        assert process.stdout is not None
        drained = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, child, process.stdout, drained)
            code = await process.wait()
            # the last lines may still be in the pipe; a grandchild holding the pipe open must
            # not keep us here, though
            with trio.move_on_after(DRAIN_TIMEOUT):
                await drained.wait()
            nursery.cancel_scope.cancel()
        await process.stdout.aclose()
        return code

    async def _pump(self, child: Child, stream: trio.abc.ReceiveStream,
                    drained: trio.Event) -> None:
        pending = bytearray()
        try:
            while True:
                try:
                    chunk = await stream.receive_some(MAX_LINE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not chunk:
                    break
                pending += chunk
                while (end := pending.find(b"\n")) >= 0:
                    self._emit(child, bytes(pending[:end]))
                    del pending[:end + 1]
                if len(pending) >= MAX_LINE:
                    self._emit(child, bytes(pending))
                    pending.clear()
            if pending:
                self._emit(child, bytes(pending))
        finally:
            drained.set()

    def _emit(self, child: Child, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        line = childlog.parse(text)
        if line is not None and line.is_access and child.keeps_access_log:
            child.access_line(raw)
            request = childlog.access_request(line.message)
            if request is not None:
                self.console.request(request)
            return
        child.log_line(raw)
        child.tail.append(text)
        self.console.child_line(child.label, text, line)

    def _signal(self, child: Child, sig: signal.Signals) -> None:
        process = child.process
        if process is None or process.returncode is not None:
            return
        try:
            # the child leads its own process group (start_new_session): signal all of it
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            process.send_signal(sig)

    async def _wait_finished(self, children: list[Child], within: float, *,
                             hurry: bool = True) -> None:
        with trio.move_on_after(within):
            async with trio.open_nursery() as nursery:
                if hurry:
                    nursery.start_soon(_cancel_when_set, self._hurry, nursery.cancel_scope)
                for child in children:
                    await child.finished.wait()
                nursery.cancel_scope.cancel()

    def _sweep(self) -> list[str]:
        """Kill every process we know of (or, for the runner, every descendant) that is still
        alive; one description per process killed."""
        found: dict[int, psutil.Process] = {}
        if self.sweep_all_descendants:
            try:
                for proc in psutil.Process().children(recursive=True):
                    found[proc.pid] = proc
            except psutil.Error:
                pass
        for pid, created in self._known:
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    found.setdefault(pid, proc)
            except psutil.Error:
                continue
        alive: list[psutil.Process] = []
        described: list[str] = []
        for proc in found.values():
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                described.append(f"pid {proc.pid} ({shlex.join(proc.cmdline()) or proc.name()})")
                proc.kill()
                alive.append(proc)
            except psutil.Error:
                continue
        _wait_gone(alive, self.kill_timeout)
        return described


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _wait_gone(procs: list[psutil.Process], within: float) -> None:
    """Wait until each process has exited: reaped if it is our own child, a zombie otherwise
    (whoever its parent is now reaps it; an init that never does must not keep us waiting)."""
    deadline = time.monotonic() + within
    for proc in procs:
        try:
            proc.wait(timeout=0.05)   # reaps our own children
            continue
        except psutil.TimeoutExpired:
            pass
        except psutil.Error:
            continue
        while time.monotonic() < deadline:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.Error:
                break
            time.sleep(0.02)


def _process_trees(pids: list[int]) -> set[tuple[int, float]]:
    """(pid, create time) of each process in ``pids`` and all their descendants now."""
    out: set[tuple[int, float]] = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out.add((pid, proc.create_time()))
            for sub in proc.children(recursive=True):
                try:
                    out.add((sub.pid, sub.create_time()))
                except psutil.Error:
                    continue
        except psutil.Error:
            continue
    return out
