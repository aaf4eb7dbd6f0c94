"""Exponential backoff with jitter, as a pure function of the attempt number and a random draw."""

from __future__ import annotations


def backoff_delay(attempt: int, rand: float, *, base: float = 0.25, cap: float = 30.0) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): exponential growth capped at
    ``cap``, with "equal jitter" (half fixed, half random) so that many hosts retrying after
    the same outage spread out instead of arriving together. ``rand`` is in [0, 1)."""
    ceiling: float = min(cap, base * 2.0 ** min(attempt, 32))
    return ceiling / 2 + rand * ceiling / 2
