"""Shared test setup.

Async tests outside ``tests/tui`` run under trio (pytest-trio). Trio mode is not switched on
globally so that the Textual (asyncio) tests in ``tests/tui`` are never captured by it.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

# One process per meshd in the suite (``workers = "auto"`` would start a worker process per
# core in every daemon a test starts): tests/workers sets MESHD_WORKERS itself.
os.environ.setdefault("MESHD_WORKERS", "1")

_TUI = Path(__file__).parent / "tui"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        func = getattr(item, "function", None)
        if func is None or not inspect.iscoroutinefunction(func):
            continue
        if _TUI in Path(str(item.fspath)).parents:
            continue
        if item.get_closest_marker("trio") is None:
            item.add_marker(pytest.mark.trio)
