"""Access log lines, one per request (or refused TCP connection), on the ``meshd.access``
logger: ``MESHD_ACCESS_LOG=text`` (the default), ``json`` (one object per line), or ``off``.

Callers check ``AccessLog.enabled`` before building an ``AccessEntry``, so with ``off`` (or the
logger above INFO) nothing is formatted or even gathered on the request path.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

logger = logging.getLogger("meshd.access")
ENV = "MESHD_ACCESS_LOG"
MAX_TARGET = 200


class AccessLogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"
    OFF = "off"


def format_from_env(environ: Mapping[str, str] | None = None) -> AccessLogFormat:
    raw = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    try:
        return AccessLogFormat(raw) if raw else AccessLogFormat.TEXT
    except ValueError:
        logging.getLogger(__name__).warning("%s=%r is not one of text, json, off: using text",
                                            ENV, raw)
        return AccessLogFormat.TEXT


@dataclass(slots=True, kw_only=True)
class AccessEntry:
    direction: str  # "inbound" / "outbound"
    source: str  # the calling service (its identity), "unknown" for plaintext
    destination: str
    method: bytes
    target: bytes
    status: int
    duration: float  # seconds
    request_id: str = ""
    route: str = ""
    subset: str = ""
    endpoint: str = ""
    detail: str = ""  # why meshd answered itself, or what went wrong
    tries: int = 0
    error: str = ""  # the x-meshd-error code of meshd's own answer
    failover_from: str = ""  # the subset drawn, when another one (its failover) served


class AccessLog:
    def __init__(self, fmt: AccessLogFormat | None = None) -> None:
        self.format = format_from_env() if fmt is None else fmt

    @property
    def enabled(self) -> bool:
        return self.format is not AccessLogFormat.OFF and logger.isEnabledFor(logging.INFO)

    def record(self, entry: AccessEntry) -> None:
        if not self.enabled:
            return
        if self.format is AccessLogFormat.JSON:
            logger.info("%s", as_json(entry))
        else:
            logger.info("%s", as_text(entry))


def _text(raw: bytes, limit: int | None = None) -> str:
    return raw[:limit].decode("ascii", "backslashreplace")


def as_text(e: AccessEntry) -> str:
    tries = f" tries={e.tries}" if e.tries > 1 else ""
    detail = f" ({e.detail})" if e.detail else ""
    extra = (f" error={e.error}" if e.error else "") + (
        f" failover_from={e.failover_from}" if e.failover_from else "")
    return (f"{e.direction} {e.source} -> {e.destination} route={e.route or '-'} "
            f"subset={e.subset or '-'} endpoint={e.endpoint or '-'} {_text(e.method, 32)} "
            f"{_text(e.target, MAX_TARGET)} {e.status} {e.duration * 1000:.1f}ms "
            f"id={e.request_id or '-'}{tries}{extra}{detail}")


def as_json(e: AccessEntry) -> str:
    return json.dumps({
        "direction": e.direction, "source": e.source, "destination": e.destination,
        "method": _text(e.method, 32), "target": _text(e.target, MAX_TARGET),
        "status": e.status, "duration_ms": round(e.duration * 1000, 3),
        "request_id": e.request_id, "route": e.route, "subset": e.subset,
        "endpoint": e.endpoint, "tries": e.tries, "detail": e.detail, "error": e.error,
        "failover_from": e.failover_from,
    }, separators=(",", ":"))
