"""The ops tests reuse the daemon tests' in-process mesh (registry + CA on loopback) to run
``meshd run`` against; ``tests/daemon`` is put on the import path for that."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ops_testing import NotifySocket

_DAEMON_TESTS = str(Path(__file__).resolve().parent.parent / "daemon")
if _DAEMON_TESTS not in sys.path:
    sys.path.insert(0, _DAEMON_TESTS)


@pytest.fixture
async def listener() -> AsyncIterator[NotifySocket]:
    """systemd's end of NOTIFY_SOCKET, for one test."""
    from ops_testing import NotifySocket

    sock = await NotifySocket().bind()
    try:
        yield sock
    finally:
        sock.close()
