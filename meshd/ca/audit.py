"""The CA's audit log: one JSON object per line in ``audit.log`` (0600), appended for every
issuance, refusal, revocation, rotation and token minted.

Each line says when, what happened (``action``), who asked (``who``: a node and its address, an
operator at the command line), about what (``what``: a SPIFFE ID or a node), and where relevant
the ``serial``, ``not_after``, ``root`` and ``reason``. Only token *ids* ever appear: callers never
hand a token's secret or a key to ``event`` (and ``event`` refuses fields that could carry them).

The log is bounded: once ``audit.log`` reaches ``MAX_BYTES`` it is renamed ``audit.log.1`` (the
older ones shift to ``.2`` ... ``.KEEP``, the oldest is dropped) before the next line is written,
so the CA directory holds at most ``(KEEP + 1) * MAX_BYTES`` of audit (640 MiB by default).
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
MAX_BYTES = 64 * 1024 * 1024
KEEP = 9
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


def append(directory: str | os.PathLike[str], records: Iterable[Mapping[str, Any]], *,
           max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
    """Append ``records`` to ``<directory>/audit.log`` (created 0600) and fsync, rotating it
    first when it has reached ``max_bytes``. Blocking; raises OSError. Callers hold the CA's
    lock, so lines from concurrent processes never interleave and a rotation is never raced."""
    lines = "".join(json.dumps(dict(r), separators=(",", ":"), sort_keys=True) + "\n"
                    for r in records)
    if not lines:
        return
    path = Path(directory) / AUDIT_FILE
    try:
        if path.stat().st_size >= max_bytes:
            _rotate(path, keep)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, lines.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _rotate(path: Path, keep: int) -> None:
    for n in range(keep, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            if n == keep:
                older.unlink()
            else:
                older.rename(path.with_name(f"{path.name}.{n + 1}"))
    if keep > 0:
        path.rename(path.with_name(f"{path.name}.1"))
    else:
        path.unlink()


def read(directory: str | os.PathLike[str], *, keep: int = KEEP) -> list[dict[str, Any]]:
    """Every record still kept, oldest first, rotated files included (for tests and operators'
    scripts)."""
    path = Path(directory) / AUDIT_FILE
    records: list[dict[str, Any]] = []
    for n in range(keep, -1, -1):
        part = path.with_name(f"{path.name}.{n}") if n else path
        try:
            text = part.read_text()
        except FileNotFoundError:
            continue
        records += [json.loads(line) for line in text.splitlines() if line.strip()]
    return records
