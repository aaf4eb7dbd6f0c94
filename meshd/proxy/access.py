"""Access log lines, one per request (or refused TCP connection), on the ``meshd.access``
logger, in the format ``[access_log] format`` in meshd.toml names, or ``MESHD_ACCESS_LOG``
(which wins over the file): ``text`` (the default), ``json`` (one JSON object per line),
``envoy`` (Envoy's default access log format) or ``off``.

JSON and Envoy lines are written verbatim (``meshd.logformat.VERBATIM``): each line on the
stream is exactly the object or the Envoy line, without the log prefix, in whichever
``--log-format`` the daemon writes its own lines. A text line is an ordinary log message.

Callers check ``AccessLog.enabled`` before building an ``AccessEntry``, so with ``off`` (or the
logger above INFO) nothing is formatted or even gathered on the request path. An entry keeps
the request's headers as received and the ``traceparent`` this hop sent on; what the line shows
of them (user agent, authority, trace and span ids) is read only when the line is written.

Response flags (``flags``; Envoy's ``%RESPONSE_FLAGS%``) say why a request did not simply get
its upstream's answer, from the ``x-meshd-error`` code of meshd's own answer (``FLAG_OF_ERROR``)
and what happened on the way: ``DI`` a delay was injected, ``URX`` the last of several tries
failed, ``DC`` the client went away before any answer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshd.config.schema import AccessLogFormat
from meshd.logformat import VERBATIM, rfc3339_ms
from meshd.proxy.core.http1 import Header

__all__ = ["ENV", "AccessEntry", "AccessLog", "AccessLogFormat", "as_envoy", "as_json",
           "as_text", "format_from_env", "response_flags"]

ACCESS_LOGGER = "meshd.access"
logger = logging.getLogger(ACCESS_LOGGER)
ENV = "MESHD_ACCESS_LOG"
MAX_TARGET = 200
MAX_HEADER = 200  # of a header value shown in a line (user agent, authority, ...)

# meshd's own answers (``x-meshd-error``) as Envoy's response flags; any other code is a
# connection that could not be made (``connect-failed``, ``connect-timeout``,
# ``app-connect-failed``, a refused handshake: ``wrong-identity``, ``revoked``, ...)
FLAG_OF_ERROR = {
    "no-healthy-endpoint": "UH",  # no healthy upstream
    "circuit-open": "UO",  # upstream overflow: the circuit breaker
    "timeout": "UT", "per-try-timeout": "UT",  # upstream request timeout
    "upstream-reset": "UC", "app-reset": "UC",  # upstream connection termination
    "upstream-bad-response": "UPE", "app-bad-response": "UPE",  # upstream protocol error
    "fault-injected": "FI",  # fault injected (an abort)
}
CONNECT_FAILURE_FLAG = "UF"

_TRACEPARENT = re.compile(rb"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


def format_from_env(environ: Mapping[str, str] | None = None,
                    default: AccessLogFormat = AccessLogFormat.TEXT) -> AccessLogFormat:
    """``MESHD_ACCESS_LOG`` when set (case-insensitive), else ``default`` (meshd.toml's)."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    try:
        return AccessLogFormat(raw) if raw else default
    except ValueError:
        logging.getLogger(__name__).warning(
            "%s=%r is not one of %s: using %s", ENV, raw,
            ", ".join(f.value for f in AccessLogFormat), default.value)
        return default


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
    protocol: str = "HTTP/1.1"  # as the client spoke it: HTTP/1.0, HTTP/1.1, HTTP/2
    grpc_status: str = ""
    bytes_received: int = 0  # request body bytes from the client
    bytes_sent: int = 0  # response body bytes relayed to the client
    upstream_service_time: float | None = None  # seconds until the upstream's response head
    fault_delayed: bool = False  # a fault injection delayed the request
    headers: tuple[Header, ...] = ()  # the request's headers, as received
    traceparent: bytes = b""  # this hop's, as sent on (``RequestIdentity.traceparent``)
    started: float = 0.0  # Unix time the request started; 0: ``duration`` before it is written


class AccessLog:
    def __init__(self, fmt: AccessLogFormat | None = None) -> None:
        self.format = format_from_env() if fmt is None else fmt

    @property
    def enabled(self) -> bool:
        return self.format is not AccessLogFormat.OFF and logger.isEnabledFor(logging.INFO)

    def record(self, entry: AccessEntry) -> None:
        if not self.enabled:
            return
        fmt = self.format
        if fmt is AccessLogFormat.JSON:
            logger.info("%s", as_json(entry), extra=VERBATIM)
        elif fmt is AccessLogFormat.ENVOY:
            logger.info("%s", as_envoy(entry), extra=VERBATIM)
        else:
            logger.info("%s", as_text(entry))


def _text(raw: bytes, limit: int | None = None) -> str:
    return raw[:limit].decode("ascii", "backslashreplace")


@dataclass(frozen=True, slots=True)
class _Facts:
    """What a line shows of the request's headers and this hop's trace context."""

    user_agent: str = ""
    authority: str = ""
    x_forwarded_for: str = ""
    trace_id: str = ""
    span_id: str = ""
    parent_span_id: str = ""


def _facts(e: AccessEntry) -> _Facts:
    agent = authority = forwarded = b""
    received: bytes | None = None
    for name, value in e.headers:
        lower = name.lower()
        if lower == b"user-agent":
            agent = value
        elif lower == b"host" or lower == b":authority":
            authority = value
        elif lower == b"x-forwarded-for":
            forwarded = value
        elif lower == b"traceparent" and received is None:
            received = value.strip().lower()
    trace_id = span_id = parent = ""
    sent = _TRACEPARENT.match(e.traceparent) if e.traceparent else None
    if sent is not None:
        trace_id, span_id = sent.group(1).decode(), sent.group(2).decode()
        came = _TRACEPARENT.match(received) if received else None
        # the parent is the span of the traceparent received, when this hop continued its trace
        if came is not None and came.group(1) == sent.group(1):
            parent = came.group(2).decode()
    return _Facts(_text(agent.strip(), MAX_HEADER), _text(authority.strip(), MAX_HEADER),
                  _text(forwarded.strip(), MAX_HEADER), trace_id, span_id, parent)


def response_flags(e: AccessEntry) -> str:
    """Envoy's response flags for the request, comma-separated ("" for none)."""
    flags: list[str] = []
    if e.fault_delayed:
        flags.append("DI")
    if e.error:
        flags.append(FLAG_OF_ERROR.get(e.error, CONNECT_FAILURE_FLAG))
    if e.tries > 1 and (e.status >= 500 or e.status == 0):
        flags.append("URX")
    if e.status == 0 and not e.error:
        flags.append("DC")
    return ",".join(flags)


def _started(e: AccessEntry) -> float:
    return e.started or time.time() - e.duration


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
    facts = _facts(e)
    entry: dict[str, Any] = {
        "timestamp": rfc3339_ms(_started(e)), "trace_id": facts.trace_id,
        "span_id": facts.span_id, "parent_span_id": facts.parent_span_id,
        "request_id": e.request_id, "direction": e.direction, "source": e.source,
        "destination": e.destination, "method": _text(e.method, 32),
        "target": _text(e.target, MAX_TARGET), "protocol": e.protocol, "route": e.route,
        "subset": e.subset, "endpoint": e.endpoint, "status": e.status,
        "grpc_status": e.grpc_status, "flags": response_flags(e),
        "bytes_received": e.bytes_received, "bytes_sent": e.bytes_sent,
        "duration_ms": round(e.duration * 1000, 3),
    }
    if e.upstream_service_time is not None:
        entry["upstream_service_time_ms"] = round(e.upstream_service_time * 1000, 3)
    entry.update(tries=e.tries, user_agent=facts.user_agent, authority=facts.authority,
                 x_forwarded_for=facts.x_forwarded_for, error=e.error, detail=e.detail,
                 failover_from=e.failover_from)
    return json.dumps(entry, separators=(",", ":"))


def _quoted(value: str) -> str:
    """A value inside one of the Envoy line's double-quoted fields: ``-`` when empty, and no
    quote or line break of its own that would end the field early."""
    return value.replace('"', "%22").replace("\n", "%0A").replace("\r", "%0D") if value else "-"


def as_envoy(e: AccessEntry) -> str:
    """Envoy's default access log format::

        [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
        %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
        %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
        "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"

    (on one line; ``-`` for an empty value; durations in whole milliseconds)."""
    facts = _facts(e)
    service_time = (str(int(e.upstream_service_time * 1000))
                    if e.upstream_service_time is not None else "-")
    return (f'[{rfc3339_ms(_started(e))}] "{_quoted(_text(e.method, 32))} '
            f'{_quoted(_text(e.target, MAX_TARGET))} {e.protocol}" {e.status} '
            f'{response_flags(e) or "-"} {e.bytes_received} {e.bytes_sent} '
            f'{int(e.duration * 1000)} {service_time} "{_quoted(facts.x_forwarded_for)}" '
            f'"{_quoted(facts.user_agent)}" "{_quoted(e.request_id)}" '
            f'"{_quoted(facts.authority)}" "{_quoted(e.endpoint)}"')
