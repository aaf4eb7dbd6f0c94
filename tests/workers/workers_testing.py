"""Helpers of the worker tests."""

from __future__ import annotations

import psutil
import trio


async def gone(pids: list[int], within: float) -> None:
    """Wait (bounded) until none of ``pids`` runs (a zombie waiting for its parent counts
    as ended)."""
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    with trio.fail_after(within):
        while any(alive(pid) for pid in pids):  # noqa: ASYNC110 - other processes' state
            await trio.sleep(0.05)
