"""Durations as operators write them in meshd's files (``"1m30s"``, ``"250ms"``, ``"24h"``): the
Go grammar of ``meshd.durations`` without a sign, with this package's error texts. Pure."""

from __future__ import annotations

from meshd.durations import format_short_duration, parse_go_duration

__all__ = ["format_duration", "parse_duration"]


def parse_duration(text: str) -> float:
    """Seconds in ``text`` (blanks around it are ignored); raises ValueError with the offending
    text. ``"0"`` is zero; whether zero is allowed is the caller's rule."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    seconds = parse_go_duration(s, plain=True)
    if seconds is None:
        raise ValueError(f"invalid duration {text!r} (use e.g. 500ms, 10s, 1m30s, 24h)")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest readable string for ``seconds`` (``1.5`` -> ``"1.5s"``, ``60`` -> ``"1m"``)."""
    return format_short_duration(seconds)
