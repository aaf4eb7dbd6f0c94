"""The figures of the fault scenarios, for the table ``conftest.pytest_terminal_summary``
prints at the end of the run."""

from __future__ import annotations

from typing import Any

RESULTS: list[dict[str, Any]] = []


def record(scenario: str, counts: dict[str, Any] | None = None, **figures: Any) -> None:
    """One row of the summary table: request counts (from nsagent's load) and figures."""
    counts = counts or {}
    versions = counts.get("versions", {})
    RESULTS.append({"scenario": scenario, "total": counts.get("total", "-"),
                    "ok": counts.get("ok", "-"), "failed": counts.get("failed", "-"),
                    "v1": versions.get("v1", 0) if counts else "-",
                    "v2": versions.get("v2", 0) if counts else "-",
                    "figures": ", ".join(f"{k}={v}" for k, v in figures.items())})
