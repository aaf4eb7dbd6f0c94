"""The terminal of ``meshd up``: the runner's own ``meshd up: ...`` lines, and what its children
say. No colour when the stream is not a terminal or ``NO_COLOR`` is set. Writes are plain
blocking writes of one line: the terminal is not a place where a mesh should wait, but one line
at a time it never has to.

Two ways to show the children (their log files always have everything):

- ``verbose``: every line behind a coloured ``[label]`` prefix (the supervisor's own tests, and
  ``meshd up --verbose``);
- otherwise events only: warnings and errors of children once the mesh is ready (those before
  are expected while the registry and CA come up: they are held, and shown only if the start
  fails or that child exits), a one-line summary when a new route table version is applied, and,
  on a terminal, a status line redrawn in place (``status``).

Access log lines never reach the terminal: the supervisor writes them to per-host files and
only counts them here (``request``).
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Iterable
from typing import TextIO

from meshd.dev import childlog

_RESET = "\033[0m"
_BOLD = "\033[1m"
_DIM = "\033[2m"
_CLEAR_LINE = "\r\033[K"
# readable on dark and light backgrounds; red is kept for errors
_PALETTE = ("\033[36m", "\033[32m", "\033[35m", "\033[33m", "\033[34m",
            "\033[96m", "\033[92m", "\033[95m", "\033[93m", "\033[94m")
_ERROR = "\033[31m"
_WARNING = "\033[33m"

RUNNER = "meshd up"
HELD_LINES = 200   # runner lines kept while muted (the newest)
EARLY_LINES = 20   # a child's warnings and errors held before the mesh is ready (the newest)
EXIT_TAIL = 5      # a child's last lines shown when it exits on its own (compact mode)


def wants_color(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    return is_terminal(stream)


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Console:
    def __init__(self, stream: TextIO, *, color: bool | None = None,
                 verbose: bool = True, live: bool | None = None) -> None:
        self._stream: TextIO | None = stream
        self.color = wants_color(stream) if color is None else color
        self.verbose = verbose
        # a status line redrawn in place: only on a terminal
        self.live = (not verbose and is_terminal(stream)) if live is None else live
        self._colors: dict[str, str] = {}
        self._width = 0
        self._muted = False
        self._held: deque[str] = deque(maxlen=HELD_LINES)
        self._ready = False
        self._early: dict[str, deque[str]] = {}
        self._routes_seen: set[str] = set()
        self._status = ""
        self.requests = 0        # requests seen entering the mesh (outbound access lines)
        self.failed = 0          # of which failed (5xx, or no answer)

    # -- lifecycle --------------------------------------------------------------------------

    def mute(self) -> None:
        """Something else owns the terminal (the console of ``meshd up --tui``): drop the
        children's lines (their logs have them) and hold the runner's own until ``unmute``."""
        self._clear_status()
        self._muted = True

    def unmute(self) -> None:
        self._muted = False
        held, self._held = list(self._held), deque(maxlen=HELD_LINES)
        for line in held:
            self._write(line)

    def ready(self) -> None:
        """The mesh is up: from now on children's warnings and errors are shown as they come.
        The ones held during the start are expected (a meshd waiting for the registry or CA
        being started): only counted."""
        self._ready = True
        held = sum(len(lines) for lines in self._early.values())
        self._early.clear()
        if held and not self.verbose:
            self._write(self._dim(f"({held} warning(s) while the mesh was starting; expected "
                                  "while the registry and CA came up; the logs have them)"))
        self.say("ready")

    def start_failed(self) -> None:
        """The start failed: show the warnings and errors held meanwhile, they may say why."""
        for label, lines in self._early.items():
            for line in lines:
                self._show_child(label, line, loud=True)
        self._early.clear()

    def register(self, label: str) -> None:
        """Give ``label`` its colour and widen the prefix column to fit it."""
        if label not in self._colors:
            self._colors[label] = _PALETTE[len(self._colors) % len(_PALETTE)]
        self._width = max(self._width, len(label) + 2)

    # -- children ---------------------------------------------------------------------------

    def child_line(self, label: str, text: str, line: childlog.LogLine | None = None) -> None:
        if self._muted:
            return
        if self.verbose:
            self._show_child(label, text)
            return
        line = childlog.parse(text) if line is None else line
        if line is None:
            return
        if line.loud:
            if self._ready:
                self._show_child(label, text, loud=True)
            else:
                self._early.setdefault(label, deque(maxlen=EARLY_LINES)).append(text)
            return
        applied = childlog.routes_applied(line)
        if applied is not None and applied.version not in self._routes_seen:
            # the first meshd to apply a version says it; the versions of the start are known
            self._routes_seen.add(applied.version)
            if not self._ready:
                return
            self.say(f"routes version {applied.version} (signed by {applied.signer}) applied "
                     f"by {label}: {applied.summary}")

    def request(self, request: childlog.Request) -> None:
        """An access log line of a child (its file has it)."""
        if request.outbound:
            self.requests += 1
            self.failed += request.failed

    def child_exited(self, label: str, what: str, tail: Iterable[str]) -> None:
        """A child exited on its own: say so at once, with its last lines (and what it held)."""
        self.error(what)
        if self.verbose or self._muted:
            return
        early = list(self._early.pop(label, ()))
        last = [line for line in list(tail)[-EXIT_TAIL:] if line not in early]
        for text in (*early, *last):
            self._show_child(label, text, loud=True)

    # -- the runner's own lines -------------------------------------------------------------

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

    def status(self, text: str) -> None:
        """Redraw the status line (a terminal only; nothing otherwise)."""
        if not self.live or self._muted or self._stream is None:
            return
        width = shutil.get_terminal_size((100, 24)).columns - 1
        self._status = text if len(text) <= width else text[:max(0, width - 1)] + "…"
        self._put(_CLEAR_LINE + self._dim(self._status))

    def clear_status(self) -> None:
        self._clear_status()
        self._status = ""

    # ----------------------------------------------------------------------------------------

    def _show_child(self, label: str, text: str, *, loud: bool = False) -> None:
        prefix = f"[{label}]".ljust(self._width)
        if self.color:
            prefix = f"{self._colors.get(label, '')}{prefix}{_RESET}"
            if loud:
                line = childlog.parse(text)
                colour = _WARNING if line is not None and line.level == "WARNING" else _ERROR
                text = f"{colour}{text}{_RESET}"
        self._write(f"{prefix} {text}")

    def _dim(self, text: str) -> str:
        return f"{_DIM}{text}{_RESET}" if self.color else text

    def _clear_status(self) -> None:
        if self._status and not self._muted:
            self._put(_CLEAR_LINE)

    def _write(self, line: str) -> None:
        if self._muted:
            self._held.append(line)
            return
        if self._status:
            # the status line stays the last line: cleared, the line written, redrawn
            self._put(f"{_CLEAR_LINE}{line}\n{self._dim(self._status)}")
        else:
            self._put(line + "\n")

    def _put(self, text: str) -> None:
        if self._stream is None:
            return
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            # the terminal went away (closed pipe, hung-up tty): the logs still have everything
            self._stream = None
