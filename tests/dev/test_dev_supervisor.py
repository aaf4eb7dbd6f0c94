"""The supervisor with real child processes: output, restart with backoff, ordered stop,
SIGKILL after the deadline, and no process left behind."""

from __future__ import annotations

import io
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import trio

from meshd.dev.console import Console
from meshd.dev.supervisor import ChildSpec, Supervisor, describe_exit, restart_delay
from meshd.errors import MeshError

PY = sys.executable


def py(code: str) -> tuple[str, ...]:
    return (PY, "-u", "-c", textwrap.dedent(code))


def spec(tmp_path: Path, label: str, code: str, group: int = 0) -> ChildSpec:
    return ChildSpec(label, py(code), tmp_path / "logs" / f"{label}.log", group)


# a child that says when SIGTERM reached it, then exits
POLITE = """
    import signal, sys, time
    def stop(*_):
        print("got SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("up", flush=True)
    while True:
        time.sleep(1)
"""


async def wait_for(predicate: object, within: float = 10.0) -> None:
    assert callable(predicate)
    with trio.fail_after(within):
        while True:   # the state of other processes: polled
            if predicate():
                return
            await trio.sleep(0.02)


def test_restart_delay_doubles_up_to_the_cap() -> None:
    assert [restart_delay(n, 0.5, 10) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert restart_delay(0, 0.5, 10) == 0.5


def test_describe_exit() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by SIGKILL"


async def test_output_is_prefixed_on_the_terminal_and_kept_in_a_log(tmp_path: Path) -> None:
    out = io.StringIO()
    supervisor = Supervisor(Console(out, color=False))
    async with supervisor.running():
        child = await supervisor.start(spec(tmp_path, "talker", POLITE))
        await wait_for(lambda: "up" in child.tail)
    assert "[talker] up" in out.getvalue()
    assert "[talker] got SIGTERM" in out.getvalue()
    log = (tmp_path / "logs" / "talker.log").read_text()
    assert "started pid" in log and "up\n" in log and "got SIGTERM\n" in log
    assert child.exit_codes == [0]


async def test_colour_prefix_when_asked() -> None:
    out = io.StringIO()
    console = Console(out, color=True)
    console.register("web v1")
    console.child_line("web v1", "hello")
    assert out.getvalue().startswith("\033[36m[web v1]\033[0m hello")


async def test_a_child_that_dies_is_restarted_with_growing_backoff(tmp_path: Path) -> None:
    out = io.StringIO()
    supervisor = Supervisor(Console(out, color=False), backoff_base=0.05, backoff_cap=0.2)
    async with supervisor.running():
        child = await supervisor.start(spec(tmp_path, "flaky", """
            print("starting", flush=True)
            raise SystemExit(3)
        """))
        await wait_for(lambda: child.starts >= 5)
    text = out.getvalue()
    assert "flaky exited (exit code 3)" in text
    delays = [line.rsplit(" ", 1)[1] for line in text.splitlines()
              if "restarting it in" in line]
    assert delays[:4] == ["0.05s", "0.1s", "0.2s", "0.2s"]
    assert "restarted flaky" in text
    assert text.count("[flaky] starting") >= 4
    assert set(child.exit_codes[:4]) == {3}


async def test_children_are_stopped_group_by_group(tmp_path: Path) -> None:
    out = io.StringIO()
    supervisor = Supervisor(Console(out, color=False))
    async with supervisor.running():
        last = await supervisor.start(spec(tmp_path, "registry", POLITE, group=2))
        first = await supervisor.start(spec(tmp_path, "meshd", POLITE, group=0))
        middle = await supervisor.start(spec(tmp_path, "app", POLITE, group=1))
        await wait_for(lambda: all("up" in c.tail for c in (first, middle, last)))
    lines = [line for line in out.getvalue().splitlines() if "got SIGTERM" in line]
    assert lines == ["[meshd]    got SIGTERM", "[app]      got SIGTERM",
                     "[registry] got SIGTERM"]


async def test_a_child_ignoring_sigterm_is_killed_after_the_deadline(tmp_path: Path) -> None:
    out = io.StringIO()
    supervisor = Supervisor(Console(out, color=False), stop_timeout=0.5)
    async with supervisor.running():
        child = await supervisor.start(spec(tmp_path, "stubborn", """
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("up", flush=True)
            time.sleep(60)
        """))
        await wait_for(lambda: "up" in child.tail)
        pid = child.pid
    assert "stubborn did not stop within 0.5s; killing it" in out.getvalue()
    assert child.exit_codes == [-9]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_hurry_skips_the_graceful_wait(tmp_path: Path) -> None:
    supervisor = Supervisor(Console(io.StringIO(), color=False), stop_timeout=30)
    with trio.fail_after(10):
        async with supervisor.running():
            child = await supervisor.start(spec(tmp_path, "stubborn", """
                import signal, time
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                print("up", flush=True)
                time.sleep(60)
            """))
            await wait_for(lambda: "up" in child.tail)
            supervisor.hurry()
    assert child.exit_codes == [-9]


async def test_an_escaped_grandchild_is_found_and_killed(tmp_path: Path) -> None:
    # the grandchild leaves the child's process group (setsid) and ignores SIGTERM, so neither
    # the group SIGTERM nor the group SIGKILL reaches it: only the psutil sweep does
    # (it also keeps the pipe open after its parent died: the pump must not wait for it)
    grandchild = textwrap.dedent("""
        import os, signal, time
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("grandchild", os.getpid(), flush=True)
        time.sleep(60)
    """)
    out = io.StringIO()
    supervisor = Supervisor(Console(out, color=False))
    async with supervisor.running():
        child = await supervisor.start(spec(tmp_path, "parent", f"""
            import subprocess, sys, time
            subprocess.Popen([sys.executable, "-c", {grandchild!r}])
            time.sleep(60)
        """))
        await wait_for(lambda: any(line.startswith("grandchild") for line in child.tail))
        gpid = int(next(line for line in child.tail if line.startswith("grandchild")).split()[1])
        assert psutil.pid_exists(gpid)
    assert any(f"pid {gpid} " in line for line in supervisor.left_behind)
    assert "killed a process left behind" in out.getvalue()
    with pytest.raises(psutil.NoSuchProcess):
        proc = psutil.Process(gpid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise psutil.NoSuchProcess(gpid)


async def test_a_program_that_does_not_exist_is_a_mesh_error(tmp_path: Path) -> None:
    supervisor = Supervisor(Console(io.StringIO(), color=False))
    async with supervisor.running():
        with pytest.raises(MeshError, match="cannot start ghost"):
            await supervisor.start(ChildSpec("ghost", ("/nonexistent/program",),
                                             tmp_path / "ghost.log"))


async def test_start_outside_running_is_refused(tmp_path: Path) -> None:
    supervisor = Supervisor(Console(io.StringIO(), color=False))
    with pytest.raises(MeshError, match="not running"):
        await supervisor.start(spec(tmp_path, "x", "pass"))
