"""What a listener decides about its connections, as pure code (no trio, no sockets): which
connection to refuse at accept, when to hand memory back after a flood, and how often to say
so in the log. The trio shell is ``meshd.conns.guard``.

* ``Admission`` counts the connections open on one listener, in total and per source address,
  against its ``ListenerLimits``, and against a cap shared by every listener of the process
  (``ProcessCount``: the file descriptors it may spend on connections).
* ``TrimPolicy`` watches the number of open connections: after a flood (a high-water mark of at
  least ``min_peak``) has fallen to ``fall_ratio`` of its peak, the freed memory is worth handing
  back to the system.
* ``RefusalLog`` lets one line through per listener and reason every ``interval`` seconds and
  counts what it held back, so a flood is reported without flooding the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from meshd.config.schema import ListenerLimits


class Refused(StrEnum):
    """Why a connection was closed at accept (the ``reason`` label of the metric)."""

    LISTENER_LIMIT = "listener_limit"
    SOURCE_LIMIT = "source_limit"
    PROCESS_LIMIT = "process_limit"


class ProcessCount:
    """Connections open across every listener of a process, against ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0


class Admission:
    """One listener's open connections, in total and per source address."""

    def __init__(self, limits: ListenerLimits, process: ProcessCount) -> None:
        self.limits = limits
        self.process = process
        self.open = 0
        self.by_source: dict[str, int] = {}  # only sources with a connection open

    def admit(self, source: str) -> Refused | None:
        """Count a new connection from ``source``, or say which cap refuses it (nothing is
        counted then)."""
        if self.open >= self.limits.max_connections:
            return Refused.LISTENER_LIMIT
        held = self.by_source.get(source, 0)
        per_source = self.limits.max_per_source
        if per_source is not None and held >= per_source:
            return Refused.SOURCE_LIMIT
        if self.process.open >= self.process.limit:
            return Refused.PROCESS_LIMIT
        self.open += 1
        self.process.open += 1
        self.by_source[source] = held + 1
        return None

    def release(self, source: str) -> None:
        """A connection ``admit`` let in has closed."""
        self.open -= 1
        self.process.open -= 1
        held = self.by_source[source] - 1
        if held:
            self.by_source[source] = held
        else:
            del self.by_source[source]

    def describe(self, reason: Refused, source: str) -> str:
        """The cap that refused a connection from ``source``, in words."""
        if reason is Refused.LISTENER_LIMIT:
            return f"{self.open} connections open (max_connections = " \
                   f"{self.limits.max_connections})"
        if reason is Refused.SOURCE_LIMIT:
            return f"{self.by_source.get(source, 0)} connections open from {source} " \
                   f"(max_connections_per_source = {self.limits.max_per_source})"
        return f"{self.process.open} connections open in this process, the most its file " \
               f"descriptor limit allows ({self.process.limit})"


@dataclass
class TrimPolicy:
    """When to hand memory back: once the open connections have fallen to ``fall_ratio`` of a
    high-water mark of at least ``min_peak``. The mark then restarts from what is open, so a
    flood that drains slowly is trimmed a few times on the way down, a quiet listener never."""

    min_peak: int = 256
    fall_ratio: float = 0.5
    high_water: int = 0

    def opened(self, open_now: int) -> None:
        self.high_water = max(self.high_water, open_now)

    def closed(self, open_now: int) -> bool:
        """Whether to trim now that a connection closed, leaving ``open_now``."""
        if self.high_water >= self.min_peak and open_now <= self.high_water * self.fall_ratio:
            self.high_water = open_now
            return True
        return False


class RefusalLog:
    """Rate limit for the refusal log line: at most one per (listener, reason) every
    ``interval`` seconds."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next: dict[tuple[str, Refused], float] = {}
        self._held: dict[tuple[str, Refused], int] = {}

    def should_log(self, listener: str, reason: Refused, now: float) -> int | None:
        """None: stay quiet (counted); otherwise log now, mentioning the returned number of
        refusals held back since the last line."""
        key = (listener, reason)
        if now < self._next.get(key, float("-inf")):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._next[key] = now + self.interval
        return self._held.pop(key, 0)
