"""A real terminal for the tests: a tmux server of our own, on its own socket.

Each ``Tmux`` gets a socket of its own, in a fresh temporary directory, so one test's server going
away never meets the next test's ``new-session``: tmux answers "server exited unexpectedly" to a
client that connects while a server on the same socket is shutting down. ``close`` kills the
server, waits until its process is gone and removes the directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from proc_testing import required_program


class Tmux:
    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="meshd-tmux-"))
        # no user configuration; UTF-8 whatever the caller's locale
        self.base = ["tmux", "-u", "-f", "/dev/null", "-S", str(self.directory / "socket")]
        self.env = {**os.environ, "LANG": "C.UTF-8"}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=20,
                              env=self.env)

    def __call__(self, *args: str) -> str:
        """Runs a tmux command; its stdout, or an AssertionError with tmux's own words."""
        done = self.run(*args)
        assert done.returncode == 0, f"tmux {' '.join(args)}: exit {done.returncode}: " \
                                     f"{done.stderr.strip()}"
        return done.stdout

    def has_session(self, name: str) -> bool:
        return self.run("has-session", "-t", name).returncode == 0

    def screen(self, target: str) -> str:
        return self("capture-pane", "-p", "-t", target)

    def wait_for(self, text: str, target: str, within: float = 20.0) -> str:
        deadline = time.monotonic() + within
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen(target)
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not on the screen within {within:g}s:\n{screen}")

    def close(self) -> None:
        """Kills the server (and so every pane's process group) and waits for it to be gone."""
        shown = self.run("display-message", "-p", "#{pid}")
        self.run("kill-server")
        if shown.returncode == 0 and shown.stdout.strip().isdigit():
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(int(shown.stdout)).wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def tmux_server() -> Iterator[Tmux]:
    required_program("tmux", "tmux")
    tmux = Tmux()
    try:
        yield tmux
    finally:
        tmux.close()
