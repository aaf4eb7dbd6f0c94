"""A stand-in for ``meshd up`` in tests: the runner's real signal handling, supervisor and final
sweep, with sleepers instead of a mesh. Usage: ``python sleepy_runner.py LOG_DIR [--fail]``."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import trio

from meshd.dev.console import Console
from meshd.dev.runner import supervise_until_signal
from meshd.dev.supervisor import ChildSpec, Supervisor
from meshd.errors import MeshError

SLEEPER = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("up", flush=True)
    time.sleep(120)
""")
# a child with a grandchild in its process group, and one that ignores SIGTERM
PARENT = textwrap.dedent("""
    import signal, subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("up", flush=True)
    time.sleep(120)
""")


def main() -> int:
    logs = Path(sys.argv[1])
    fail = "--fail" in sys.argv[2:]
    console = Console(sys.stdout, color=False)
    supervisor = Supervisor(console, stop_timeout=1.0, sweep_all_descendants=True)

    async def bring_up(sup: Supervisor) -> None:
        for label, group, code in (("meshd host-a", 0, SLEEPER), ("web v1", 1, PARENT),
                                   ("registry", 2, SLEEPER)):
            await sup.start(ChildSpec(label, (sys.executable, "-u", "-c", code),
                                      logs / f"{label}.log", group))
        with trio.fail_after(10):
            while True:   # the state of other processes: polled
                if all("up" in c.tail for c in sup.children):
                    break
                await trio.sleep(0.02)
        if fail:
            raise MeshError("meshd host-a did not become ready within 0s (a test)")
        console.say("ready")

    return trio.run(supervise_until_signal, console, supervisor, bring_up)


if __name__ == "__main__":
    sys.exit(main())
