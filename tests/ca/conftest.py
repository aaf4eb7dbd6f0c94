"""Fixtures for the CA tests: a CA directory and a CA server on a real loopback port."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest
import trio
from ca_testing import TRUST_DOMAIN

from meshd.ca.server import CAEndpoint, serve_ca
from meshd.ca.store import CAMaterial, init_ca


@pytest.fixture
def ca(tmp_path: Path) -> CAMaterial:
    return init_ca(tmp_path / "ca", TRUST_DOMAIN, now=datetime.now(UTC))


@pytest.fixture
async def ca_server(ca: CAMaterial, nursery: trio.Nursery) -> CAEndpoint:
    endpoint: CAEndpoint = await nursery.start(partial(serve_ca, ca.directory, "127.0.0.1", 0))
    return endpoint
