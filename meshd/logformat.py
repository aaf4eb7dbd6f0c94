"""How meshd's long-running commands write their log lines (``--log-format``, or
``MESHD_LOG_FORMAT``): ``text``, ``<date> <time>,<ms> LEVEL logger: message`` as always, or
``json``, one object per line with ``timestamp`` (RFC 3339, UTC, milliseconds), ``level``,
``logger``, ``message``, ``exception`` when the record carries one, and any structured fields
the record was given (``log.info(..., extra={"endpoint": key})``).

A record marked ``verbatim`` (``VERBATIM``: an access log line already formatted as JSON or in
Envoy's format) is written as its message alone, in either format, so that every such line
is what its format promises, whatever else shares the stream.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TextIO

ENV = "MESHD_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# ``logger.info("%s", line, extra=VERBATIM)``: the line goes out as it is
VERBATIM_ATTR = "meshd_verbatim"
VERBATIM: Mapping[str, object] = {VERBATIM_ATTR: True}

# what every LogRecord has: anything else on a record is a structured field given by ``extra``
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime",
                                                                  "taskName", VERBATIM_ATTR}


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


def format_from_env(environ: Mapping[str, str] | None = None) -> LogFormat:
    """``MESHD_LOG_FORMAT`` (case-insensitive), text when unset or unknown."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    return LogFormat.JSON if raw == LogFormat.JSON else LogFormat.TEXT


def rfc3339_ms(seconds: float) -> str:
    """``2026-12-04T23:55:36.123Z`` for a Unix time."""
    whole = int(seconds)
    millis = int((seconds - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, VERBATIM_ATTR, False):
            return record.getMessage()
        return super().format(record)


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line (a message's own line breaks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if getattr(record, VERBATIM_ATTR, False):
            return message
        entry: dict[str, Any] = {
            "timestamp": rfc3339_ms(record.created), "level": record.levelname,
            "logger": record.name, "message": message,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key not in entry:
                entry[key] = value
        return json.dumps(entry, default=str, ensure_ascii=False, separators=(",", ":"))


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JSONFormatter() if fmt is LogFormat.JSON else TextFormatter()


def configure(level: int, fmt: LogFormat, stream: TextIO) -> None:
    """The root logger's handler, writing to ``stream`` in ``fmt`` (as ``logging.basicConfig``:
    nothing changes when the root logger has handlers already)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
