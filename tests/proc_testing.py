"""Helpers for tests that run meshd (or anything) as a child process and read its output.
``pyproject.toml`` puts ``tests/`` on ``sys.path``: ``from proc_testing import Output``."""

from __future__ import annotations

import io
import queue
import shutil
import threading
import time

import pytest
import trio


def required_program(name: str, package: str) -> str:
    """The path of ``name``, a real peer the tests run (``.ci/run`` installs its Debian
    ``package``); a clear failure naming the package when it is missing."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: apt-get install {package} (.ci/run installs it)")
    return found


class Output:
    """Lines of a child's stdout, read by a thread, waited for with a deadline."""

    def __init__(self, stream: io.BufferedReader) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._closed = False
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: io.BufferedReader) -> None:
        for raw in stream:
            self._queue.put(raw.decode(errors="replace").rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, within: float) -> bool:
        """Whether a line containing ``text`` arrives within ``within`` seconds (False at EOF)."""
        deadline = time.monotonic() + within
        while not self._closed and time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                self._closed = True
                break
            self.lines.append(line)
            if text in line:
                return True
        return False

    def text(self, within: float = 2.0) -> str:
        """Everything read so far, after waiting up to ``within`` for more (or EOF)."""
        self.wait_for("\0never", within)
        return "\n".join(self.lines)

    def tail(self, n: int = 60) -> str:
        """The last ``n`` lines of what has arrived, without waiting."""
        self.wait_for("\0never", 0.0)
        return "\n".join(self.lines[-n:])


async def stop_process(proc: trio.Process, within: float = 20) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``within`` seconds (shielded: also on
    the way out of a failing or cancelled test)."""
    with trio.CancelScope(shield=True):
        proc.terminate()
        with trio.move_on_after(within):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
