"""The terminal of ``meshd up``: every child's output line by line behind a coloured
``[label]`` prefix, and the runner's own ``meshd up: ...`` lines. No colour when the stream is not a
terminal or ``NO_COLOR`` is set. Writes are plain blocking writes of one line: the terminal is
not a place where a mesh should wait, but one line at a time it never has to."""

from __future__ import annotations

import os
from collections import deque
from typing import TextIO

_RESET = "\033[0m"
_BOLD = "\033[1m"
# readable on dark and light backgrounds; red is kept for errors
_PALETTE = ("\033[36m", "\033[32m", "\033[35m", "\033[33m", "\033[34m",
            "\033[96m", "\033[92m", "\033[95m", "\033[93m", "\033[94m")
_ERROR = "\033[31m"

RUNNER = "meshd up"
HELD_LINES = 200   # runner lines kept while muted (the newest)


def wants_color(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Console:
    def __init__(self, stream: TextIO, *, color: bool | None = None) -> None:
        self._stream: TextIO | None = stream
        self.color = wants_color(stream) if color is None else color
        self._colors: dict[str, str] = {}
        self._width = 0
        self._muted = False
        self._held: deque[str] = deque(maxlen=HELD_LINES)

    def mute(self) -> None:
        """Something else owns the terminal (the console of ``meshd up --tui``): drop the
        children's lines (their logs have them) and hold the runner's own until ``unmute``."""
        self._muted = True

    def unmute(self) -> None:
        self._muted = False
        held, self._held = list(self._held), deque(maxlen=HELD_LINES)
        for line in held:
            self._write(line)

    def register(self, label: str) -> None:
        """Give ``label`` its colour and widen the prefix column to fit it."""
        if label not in self._colors:
            self._colors[label] = _PALETTE[len(self._colors) % len(_PALETTE)]
        self._width = max(self._width, len(label) + 2)

    def child_line(self, label: str, text: str) -> None:
        if self._muted:
            return
        prefix = f"[{label}]".ljust(self._width)
        if self.color:
            prefix = f"{self._colors.get(label, '')}{prefix}{_RESET}"
        self._write(f"{prefix} {text}")

    def say(self, text: str) -> None:
        """A line of the runner's own: ``meshd up: text``."""
        self._write(f"{_BOLD}{RUNNER}:{_RESET} {text}" if self.color else f"{RUNNER}: {text}")

    def error(self, text: str) -> None:
        if self.color:
            self._write(f"{_BOLD}{RUNNER}:{_RESET} {_ERROR}{text}{_RESET}")
        else:
            self._write(f"{RUNNER}: {text}")

    def plain(self, text: str) -> None:
        self._write(text)

    def _write(self, line: str) -> None:
        if self._muted:
            self._held.append(line)
            return
        if self._stream is None:
            return
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            # the terminal went away (closed pipe, hung-up tty): the logs still have everything
            self._stream = None
