"""The table ``meshd up`` prints once the mesh is ready: what runs where. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    process: str
    pid: int | None
    where: str


def format_table(rows: Sequence[Row]) -> str:
    header = Row("PROCESS", None, "LISTENS ON")
    width = max(len(r.process) for r in (header, *rows))
    lines = [f"  {header.process.ljust(width)}  {'PID':>7}  {header.where}"]
    for row in rows:
        pid = str(row.pid) if row.pid is not None else "-"
        lines.append(f"  {row.process.ljust(width)}  {pid:>7}  {row.where}")
    return "\n".join(lines)
