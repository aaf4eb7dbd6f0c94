"""Short, fixed-width renderings of numbers and states for a terminal, and the status vocabulary:
every state has a symbol and a colour, so it reads the same without colour."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from enum import StrEnum

from rich.text import Text

DASH = "\u2013"  # "no value"


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    IDLE = "idle"
    STALE = "stale"


SYMBOL = {Status.OK: "✔", Status.WARN: "▲", Status.FAIL: "✘", Status.IDLE: "·",
          Status.STALE: "?"}
STYLE = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "bold red",
         Status.IDLE: "dim", Status.STALE: "magenta"}
RATE_STYLE = "cyan"  # rate charts (the colour of the sparklines and share bars)
LATENCY_STYLE = "blue"  # latency charts
EJECTED = "⊘"
HEALTHY_DOT = "●"
ORDER = [Status.OK, Status.IDLE, Status.STALE, Status.WARN, Status.FAIL]


def worst(statuses: Sequence[Status], default: Status = Status.IDLE) -> Status:
    return max(statuses, key=ORDER.index, default=default)


def badge(status: Status, text: str = "") -> Text:
    """The symbol (and text) of a status in its colour."""
    label = SYMBOL[status] + (f" {text}" if text else "")
    return Text(label, style=STYLE[status])


def rate(value: float | None) -> str:
    if value is None:
        return DASH
    if value >= 1000:
        return f"{value / 1000:.1f}k/s"
    if value >= 100:
        return f"{value:.0f}/s"
    if value >= 10:
        return f"{value:.1f}/s"
    if value == 0:
        return "0/s"
    return f"{value:.2f}/s"


def percent(value: float | None) -> str:
    if value is None:
        return DASH
    pct = value * 100
    if pct >= 99.95 or pct == 0:
        return f"{pct:.0f}%"
    return f"{pct:.1f}%"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms" if seconds >= 0.0095 else f"{seconds * 1000:.1f}ms"
    return f"{seconds:.1f}s"


def age(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def expiry(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(int(seconds), 3600)
    if hours >= 48:
        return f"{hours // 24}d{hours % 24:02d}h"
    return f"{hours}h{rest // 60:02d}m"


def expiry_status(seconds: float | None) -> Status:
    if seconds is None:
        return Status.IDLE
    if seconds <= 3600:
        return Status.FAIL
    if seconds <= 6 * 3600:
        return Status.WARN
    return Status.OK


def size(n: float | None) -> str:
    if n is None:
        return DASH
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" or n >= 10 else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.0f}G"


def clip(text: str, width: int) -> str:
    """The first line of ``text``, cut to ``width`` characters with an ellipsis."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[:width - 1].rstrip() + "…"


BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int) -> str:
    """The last ``width`` values as block characters, scaled to their maximum."""
    tail = list(values)[-width:]
    if not tail:
        return ""
    top = max(tail)
    if top <= 0:
        return BLOCKS[0] * len(tail)
    return "".join(BLOCKS[min(len(BLOCKS) - 1, int(v / top * (len(BLOCKS) - 1) + 0.5))]
                   for v in tail)


def bar(fraction: float, width: int) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "█" * filled + "░" * (width - filled)


def local_clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def utc_clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts))


ClockFormat = Callable[[float], str]
