"""Timestamps as the CA and the hosts write them in files, logs and JSON: RFC 3339 in UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def format_time(when: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``: ``2025-01-02T03:04:05Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError(f"timestamp without a time zone: {text!r}")
    return when.astimezone(UTC)


def format_time_precise(when: datetime) -> str:
    """RFC 3339 in UTC to the microsecond: ``2025-01-02T03:04:05.000001Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
