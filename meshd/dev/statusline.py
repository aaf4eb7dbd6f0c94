"""The status line ``meshd up`` keeps at the bottom of a terminal once the mesh is ready: the
request rate and failures (counted from the meshds' access log lines) and which processes run.
Pure; the runner redraws it every ``INTERVAL`` seconds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

INTERVAL = 1.0


@dataclass(frozen=True)
class Counts:
    at: float        # when (a monotonic clock)
    requests: int    # since the start
    failed: int


def status_text(processes: Sequence[tuple[str, str]], before: Counts, now: Counts) -> str:
    """``processes``: (label, state) pairs, where state is a ``ChildState`` value.

    >>> status_text([("registry", "running"), ("web v1", "waiting to restart")],
    ...             Counts(0.0, 10, 0), Counts(2.0, 30, 1))
    '10.0 req/s · 30 requests, 1 failed · 1/2 processes running · web v1 waiting to restart'
    """
    elapsed = now.at - before.at
    rate = (now.requests - before.requests) / elapsed if elapsed > 0 else 0.0
    running = sum(1 for _, state in processes if state == "running")
    text = (f"{rate:.1f} req/s · {now.requests} requests, {now.failed} failed · "
            f"{running}/{len(processes)} processes running")
    others = [f"{label} {state}" for label, state in processes if state != "running"]
    return text + "".join(f" · {other}" for other in others)
