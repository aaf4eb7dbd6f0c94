"""Before ``meshd up`` starts anything: is every address:port the mesh needs free?

A bind test with SO_REUSEADDR, like the servers themselves use, so a port whose last connection
lingers in TIME_WAIT is not taken for busy, while a port someone listens on is. When psutil may
list sockets, the message also names the process that holds the port."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable

import psutil

from meshd.config.mesh_schema import PortClaim


def ports_in_use(claims: Iterable[PortClaim]) -> list[str]:
    """One message per claim that cannot be had (empty when all are free)."""
    problems: list[str] = []
    for claim in claims:
        reason = _bind_problem(claim)
        if reason is not None:
            problems.append(f"{reason} (wanted by {claim.owner}, {claim.key_path})")
    return problems


def _bind_problem(claim: PortClaim) -> str | None:
    family = socket.AF_INET6 if ":" in claim.address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((claim.address, claim.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{claim} is already in use{_holder(claim)}"
            if exc.errno == errno.EADDRNOTAVAIL:
                return (f"address {claim.address} is not configured on this machine (on macOS: "
                        f"sudo ifconfig lo0 alias {claim.address})")
            if exc.errno == errno.EACCES:
                return f"{claim}: permission denied (ports below 1024 need privileges)"
            return f"{claim}: cannot bind: {exc.strerror or exc}"
    return None


def _holder(claim: PortClaim) -> str:
    """`` by pid N (name)`` for the process listening on the claim's port, when it can be told."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != claim.port:
                continue
            if conn.laddr.ip not in (claim.address, "0.0.0.0", "::") or conn.pid is None:
                continue
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                name = "?"
            return f" by pid {conn.pid} ({name})"
    except (psutil.Error, OSError):
        pass
    return ""
