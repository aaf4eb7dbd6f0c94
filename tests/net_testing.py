"""Helpers for tests over real loopback sockets, shared by every test directory (``pyproject.toml``
puts ``tests/`` on ``sys.path``: ``from net_testing import free_port``)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bound to port 0, read, closed)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
