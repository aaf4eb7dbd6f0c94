"""What ``meshd up`` reads in its children's output lines, so that the terminal shows events and
the files keep the detail. Pure: text in, facts out.

A meshd child logs ``<date> <time>,<ms> LEVEL logger: message`` (``--log-format text``) or one
JSON object per line with ``level``, ``logger`` and ``message`` (``--log-format json``,
``meshd.logformat``); an app prints whatever it likes (``parse`` returns None for such a line).
Access log lines (the ``meshd.access`` logger: text lines, JSON objects with ``direction`` and
``status``, or lines in Envoy's format) go to a per-host file; text and JSON ones are counted for
the status line (an Envoy line does not say its direction).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ACCESS_LOGGER = "meshd.access"
ROUTE_TABLE_LOGGER = "meshd.daemon.route_table"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOUD = frozenset({"WARNING", "ERROR", "CRITICAL"})

_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) "
                   r"(?P<logger>[\w.]+): (?P<message>.*)$")
# Envoy's default access log format starts ``[<start time>] "<method> <path> <protocol>"``
_ENVOY = re.compile(r'^\[\d{4}-\d\d-\d\dT[\d:.]+Z\] "')
_TEXT_STATUS = re.compile(r" (?P<status>\d{3}) [\d.]+ms id=")
_APPLIED = re.compile(r"^route table generation \d+ applied from the (?P<source>[\w -]+?) "
                      r"\(version (?P<version>\d+) signed by (?P<signer>\S+) at [^)]*\): "
                      r"(?P<table>.*)$")


@dataclass(frozen=True)
class LogLine:
    level: str
    logger: str
    message: str

    @property
    def loud(self) -> bool:
        return self.level in LOUD

    @property
    def is_access(self) -> bool:
        return self.logger == ACCESS_LOGGER


def parse(text: str) -> LogLine | None:
    """The level, logger and message of a meshd log line; None for anything else. An access
    log line written as JSON or in Envoy's format is its own message."""
    if text.startswith("{"):
        return _parse_json(text)
    if _ENVOY.match(text):
        return LogLine("INFO", ACCESS_LOGGER, text)
    match = _LINE.match(text)
    if match is None or match["level"] not in LEVELS:
        return None
    return LogLine(match["level"], match["logger"], match["message"])


def _parse_json(text: str) -> LogLine | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if "direction" in data and "status" in data and "logger" not in data:
        return LogLine("INFO", ACCESS_LOGGER, text)
    level, logger, message = data.get("level"), data.get("logger"), data.get("message")
    if level not in LEVELS or not isinstance(logger, str) or not isinstance(message, str):
        return None
    return LogLine(level, logger, message)


@dataclass(frozen=True)
class Request:
    outbound: bool    # seen where it entered the mesh (each request also has an inbound line)
    failed: bool      # 5xx, or no status at all


def access_request(message: str) -> Request | None:
    """The direction and outcome of one access log line (text or JSON); None if unreadable
    (an Envoy line, which has no direction)."""
    if message.startswith("["):
        return None
    if message.startswith("{"):
        try:
            data = json.loads(message)
            direction, status = str(data["direction"]), int(data["status"])
        except (ValueError, KeyError, TypeError):
            return None
    else:
        found = _TEXT_STATUS.search(message)
        direction = message.split(" ", 1)[0]
        if found is None:
            return None
        status = int(found["status"])
    return Request(outbound=direction == "outbound", failed=status == 0 or status >= 500)


@dataclass(frozen=True)
class RoutesApplied:
    version: str
    signer: str
    source: str
    summary: str


def routes_applied(line: LogLine) -> RoutesApplied | None:
    """A meshd's "route table ... applied" line, its table summarised (``summarise_routes``)."""
    if line.logger != ROUTE_TABLE_LOGGER:
        return None
    match = _APPLIED.match(line.message)
    if match is None:
        return None
    raw = match["table"]
    if raw == "(cleared)":
        summary = "no routes (cleared)"
    else:
        try:
            table = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            summary = "(unreadable table: see the meshd's log)"
        else:
            summary = (summarise_routes(table) if isinstance(table, Mapping)
                       else "(unreadable table: see the meshd's log)")
    return RoutesApplied(match["version"], match["signer"], match["source"], summary)


def summarise_routes(destinations: Mapping[str, Any]) -> str:
    """One short line for a route table in its data form (``routes_to_data()["destinations"]``):
    per destination its split (or subsets, or where an external one is), and how many match
    routes it has."""
    if not destinations:
        return "no routes"
    parts = []
    for name in sorted(destinations):
        spec = destinations[name] if isinstance(destinations[name], Mapping) else {}
        split = spec.get("split")
        external = spec.get("external")
        if isinstance(external, Mapping):
            where = external.get("hosts") or external.get("addresses") or []
            what = "external " + ", ".join(str(w) for w in where)
        elif isinstance(split, Mapping) and split:
            what = " / ".join(f"{subset} {weight}%" for subset, weight in split.items())
        elif isinstance(spec.get("subsets"), Mapping) and spec["subsets"]:
            what = "subsets " + ", ".join(spec["subsets"])
        else:
            what = "all endpoints"
        routes = spec.get("routes")
        extra = len(routes) if isinstance(routes, list) else 0
        if extra:
            what += f" (+{extra} match route{'s' if extra > 1 else ''})"
        parts.append(f"{name}: {what}")
    return "; ".join(parts)
