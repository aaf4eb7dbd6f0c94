"""Go-style duration strings (``"1m30s"``, ``"250ms"``, ``"24h"``), as Consul and operators write
them. Pure."""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in ``text``; raises ValueError with the offending text."""
    s = text.strip()
    if s in ("0", ""):
        if s == "":
            raise ValueError("empty duration")
        return 0.0
    pos = 0
    total = 0.0
    for match in _PART.finditer(s):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"invalid duration {text!r} (use e.g. 500ms, 10s, 1m30s, 24h)")
    return total


def format_duration(seconds: float) -> str:
    """The shortest readable Go-style string for ``seconds`` (``1.5`` -> ``"1.5s"``)."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds < 1 and seconds != 0:
        ms = seconds * 1000
        return f"{ms:g}ms"
    return f"{seconds:g}s"
