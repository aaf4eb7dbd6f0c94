"""The CA's audit log: one JSON object per line in ``audit.log`` (0600), appended for every
issuance, refusal, revocation, rotation and token minted.

Each line says when, what happened (``action``), who asked (``who``: a node and its address, an
operator at the command line), about what (``what``: a SPIFFE ID or a node), and where relevant
the ``serial``, ``not_after``, ``root`` and ``reason``. Only token *ids* ever appear: callers never
hand a token's secret or a key to ``event`` (and ``event`` refuses fields that could carry them).
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from meshd.timestamps import format_time

AUDIT_FILE = "audit.log"
_FORBIDDEN = frozenset({"token", "secret", "key", "key_pem", "private_key"})


def event(action: str, *, now: datetime, who: str, what: str = "", **fields: Any) -> dict[str, Any]:
    """One audit record (pure). ``fields`` with a None value are left out."""
    bad = _FORBIDDEN & fields.keys()
    if bad:
        raise ValueError(f"audit records never carry secrets: {sorted(bad)}")
    record: dict[str, Any] = {"time": format_time(now), "action": action, "who": who}
    if what:
        record["what"] = what
    for name, value in fields.items():
        if value is None:
            continue
        record[name] = format_time(value) if isinstance(value, datetime) else value
    return record


def operator() -> str:
    """Who runs a ``meshd ca`` command: ``cli:<user>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return f"cli:uid={os.getuid()}"


def append(directory: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> None:
    """Append ``records`` to ``<directory>/audit.log`` (created 0600) and fsync. Blocking;
    raises OSError. Callers hold the CA's lock, so lines from concurrent processes never
    interleave (O_APPEND writes of one line would not either)."""
    lines = "".join(json.dumps(dict(r), separators=(",", ":"), sort_keys=True) + "\n"
                    for r in records)
    if not lines:
        return
    fd = os.open(Path(directory) / AUDIT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, lines.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record so far (for tests and operators' scripts)."""
    path = Path(directory) / AUDIT_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
