"""gRPC's semantics on top of HTTP/2: status codes, ``grpc-timeout``, ``grpc-message`` and the
answers meshd makes itself. Pure.

A gRPC call is an HTTP/2 request with ``content-type: application/grpc`` (``is_grpc``). Its
outcome is not the HTTP status (always 200 when the server answered) but ``grpc-status`` in the
trailers, or in the headers of a *Trailers-Only* response: one HEADERS frame with END_STREAM,
which is how an error without a body is sent (``trailers_only``, ``grpc_status_of``).

What meshd decides here:

- **deadlines**: the client's ``grpc-timeout`` (``parse_grpc_timeout``) and the route's timeout
  both bound a call; the shorter wins (``effective_timeout``), so a route caps what a client
  asks for. Forwarded upstream, the header carries what is left (``format_grpc_timeout``).
- **meshd's own answers** are gRPC errors a client can read (a Trailers-Only response with
  ``grpc-status`` and ``grpc-message``), never an HTTP 502/503 with a text body. The code comes
  from what meshd would have answered over HTTP/1.1 (``status_for_meshd_error``, table there).
- **retries** on gRPC status codes: ``retry_on`` takes the kebab-case names of the codes worth
  retrying (``RETRY_NAMES``: cancelled, deadline-exceeded, internal, resource-exhausted,
  unavailable), beside the HTTP conditions (``retries_on``); outlier detection and the
  retry conditions that judge by HTTP status see a call's ``http_equivalent``.

An app's response without ``grpc-status`` (a proxy or web server in the way answered instead
of a gRPC server) gets the code the gRPC HTTP/2 protocol assigns to its HTTP status
(``status_for_http``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import IntEnum

from meshd.config.schema import GRPC_RETRY_CONDITIONS
from meshd.proxy.core.http1 import Header


class Status(IntEnum):
    """The canonical gRPC status codes (``name``: the canonical name, as clients print it)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @property
    def retry_name(self) -> str:
        """The kebab-case name ``retry_on`` would use (``deadline-exceeded``)."""
        return self.name.lower().replace("_", "-")


# What ``retry_on`` accepts besides the HTTP conditions (``meshd.config.schema`` lists the names,
# so the config stays free of the proxy): the codes a call may succeed on when tried again.
RETRY_NAMES: dict[str, Status] = {name: Status[name.upper().replace("-", "_")]
                                      for name in GRPC_RETRY_CONDITIONS}

CONTENT_TYPE = b"application/grpc"
GRPC_STATUS = b"grpc-status"
GRPC_MESSAGE = b"grpc-message"
GRPC_TIMEOUT = b"grpc-timeout"


def is_grpc(content_type: bytes | None) -> bool:
    """Whether a request with this ``content-type`` is a gRPC call: ``application/grpc``, alone,
    with a ``+codec`` suffix (``application/grpc+proto``) or parameters. ``application/grpc-web``
    is not: gRPC-Web is HTTP/1.1-compatible framing a browser sends, with its trailers in the
    body, and is forwarded as the plain HTTP it is."""
    if content_type is None:
        return False
    value = content_type.strip().lower()
    if not value.startswith(CONTENT_TYPE):
        return False
    rest = value[len(CONTENT_TYPE):]
    return rest == b"" or rest[:1] in (b"+", b";")


def grpc_request(headers: Iterable[Header]) -> bool:
    """Whether a request with these headers is a gRPC call (``is_grpc`` of its content-type)."""
    for name, value in headers:
        if name.lower() == b"content-type":
            return is_grpc(value)
    return False


# -- deadlines -----------------------------------------------------------------------------------

# grpc-timeout's units, in seconds, from the most precise
_UNITS = ((b"n", 1e-9), (b"u", 1e-6), (b"m", 1e-3), (b"S", 1.0), (b"M", 60.0), (b"H", 3600.0))
_UNIT_SECONDS = dict(_UNITS)
MAX_TIMEOUT_DIGITS = 8


def parse_grpc_timeout(value: bytes | None) -> float | None:
    """The seconds a ``grpc-timeout`` value (1 to 8 ASCII digits and a unit: ``H`` hours, ``M``
    minutes, ``S`` seconds, ``m`` milliseconds, ``u`` microseconds, ``n`` nanoseconds) stands
    for; None for anything else, or no value (the call then has no deadline of its own: the
    route's applies). Never raises."""
    if value is None:
        return None
    digits, unit = value[:-1], value[-1:]
    seconds = _UNIT_SECONDS.get(unit)
    if (seconds is None or not 1 <= len(digits) <= MAX_TIMEOUT_DIGITS
            or not all(0x30 <= b <= 0x39 for b in digits)):
        return None
    return int(digits) * seconds


def format_grpc_timeout(seconds: float) -> bytes:
    """``seconds`` as a ``grpc-timeout`` value in the most precise unit whose count fits 8
    digits, rounded up (a deadline sent on is never shorter than the one left); 0 or less is
    ``0n`` (already expired), beyond 99999999 hours that many hours."""
    if not seconds > 0:  # also NaN
        return b"0n"
    for unit, size in _UNITS:
        # rounded to 6 places first, so 0.1 s is 100000000n, not 100000001n from float noise
        count = math.ceil(round(seconds / size, 6))
        if count < 10 ** MAX_TIMEOUT_DIGITS:
            return str(count).encode("ascii") + unit
    return b"99999999H"


def effective_timeout(route_timeout: float | None, grpc_timeout: float | None) -> float | None:
    """The deadline of a call: the shorter of the route's timeout and the client's
    ``grpc-timeout``, either absent (None). The route's caps what a client asks for."""
    if route_timeout is None:
        return grpc_timeout
    if grpc_timeout is None:
        return route_timeout
    return min(route_timeout, grpc_timeout)


# -- status codes --------------------------------------------------------------------------------

_FROM_HTTP = {400: Status.INTERNAL, 401: Status.UNAUTHENTICATED,
              403: Status.PERMISSION_DENIED, 404: Status.UNIMPLEMENTED,
              429: Status.UNAVAILABLE, 502: Status.UNAVAILABLE,
              503: Status.UNAVAILABLE, 504: Status.UNAVAILABLE}


def status_for_http(status: int) -> Status:
    """The gRPC code of a response without ``grpc-status`` (something other than a gRPC server
    answered), by its HTTP status, as the gRPC HTTP/2 protocol maps it: 400 INTERNAL, 401
    UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 UNIMPLEMENTED, 429/502/503/504 UNAVAILABLE,
    any other UNKNOWN."""
    return _FROM_HTTP.get(status, Status.UNKNOWN)


# meshd's own codes (``x-meshd-error``, ``meshd.proxy.core.attempt``) whose gRPC code is not the
# one of their HTTP status
_FROM_MESHD_CODE = {
    "timeout": Status.DEADLINE_EXCEEDED,  # the route's (or the call's) deadline
    "per-try-timeout": Status.DEADLINE_EXCEEDED,
}


def status_for_meshd_error(status: int, code: str = "") -> Status:
    """The gRPC code of an answer meshd makes itself, the HTTP ``status`` it would give over
    HTTP/1.1 with ``x-meshd-error: code``:

    ==============================================================  ===========================
    504 ``timeout``, ``per-try-timeout`` (any 504 of meshd's)       DEADLINE_EXCEEDED
    503 nothing reached an app: ``connect-*``, ``app-connect-*``,   UNAVAILABLE (a client may
    ``no-healthy-endpoint``, ``circuit-open``, ``wrong-identity``    try again)
    502 the upstream broke off or answered garbage                  UNAVAILABLE
    403 the destination's authorization refused the caller          PERMISSION_DENIED
    413 the request body is over ``max_request_bytes``              RESOURCE_EXHAUSTED
    429 a limit of meshd's own refused the call                     RESOURCE_EXHAUSTED
    500 meshd failed                                                INTERNAL
    ``fault-injected`` (an abort with an HTTP status)               ``status_for_http``
    anything else                                                   ``status_for_http``
    ==============================================================  ===========================

    429 is RESOURCE_EXHAUSTED, not the UNAVAILABLE ``status_for_http`` gives an app's 429:
    when meshd itself sheds a call it knows it is a limit, and gRPC clients retry
    UNAVAILABLE on their own (transparently, or by their retry policy) but not
    RESOURCE_EXHAUSTED, so a limit does not bring the retries that make it worse. A route may
    still retry it with ``retry_on = ["resource-exhausted"]``, under the retry budget.
    """
    if code == "fault-injected":
        return status_for_http(status)
    found = _FROM_MESHD_CODE.get(code)
    if found is not None:
        return found
    if status == 504:
        return Status.DEADLINE_EXCEEDED
    if status in (413, 429):
        return Status.RESOURCE_EXHAUSTED
    if status == 500:
        return Status.INTERNAL
    return status_for_http(status)


_TO_HTTP: dict[int, int] = {Status.OK: 200, Status.CANCELLED: 499, Status.UNKNOWN: 500,
            Status.INVALID_ARGUMENT: 400, Status.DEADLINE_EXCEEDED: 504,
            Status.NOT_FOUND: 404, Status.ALREADY_EXISTS: 409,
            Status.PERMISSION_DENIED: 403, Status.RESOURCE_EXHAUSTED: 429,
            Status.FAILED_PRECONDITION: 400, Status.ABORTED: 409,
            Status.OUT_OF_RANGE: 400, Status.UNIMPLEMENTED: 501,
            Status.INTERNAL: 500, Status.UNAVAILABLE: 503, Status.DATA_LOSS: 500,
            Status.UNAUTHENTICATED: 401}


def http_equivalent(grpc_status: int) -> int:
    """The HTTP status a call's outcome counts as where meshd judges by HTTP status (outlier
    detection's consecutive 5xx, a ``retry_on`` status): each code's usual HTTP equivalent
    (UNAVAILABLE 503, DEADLINE_EXCEEDED 504, INTERNAL, UNKNOWN and DATA_LOSS 500, CANCELLED
    499, ...); a code outside 0-16 counts as UNKNOWN's 500. The reverse of
    ``status_for_http`` only where both are defined: HTTP has more statuses than gRPC codes."""
    return _TO_HTTP.get(grpc_status, 500)


def grpc_status_of(headers: Iterable[Header]) -> int | None:
    """The ``grpc-status`` in a header or trailer list; None when there is none, or it is not
    a decimal number (a malformed one says nothing)."""
    for name, value in headers:
        if name.lower() == GRPC_STATUS:
            text = value.strip()
            if text.isdigit() and len(text) <= 4:
                return int(text)
            return None
    return None


def retries_on(retry_on: Iterable[str], grpc_status: int) -> bool:
    """Whether a call that ended in ``grpc_status`` is one a route's ``retry_on`` retries."""
    return any(RETRY_NAMES.get(condition) == grpc_status for condition in retry_on)


# -- grpc-message and meshd's own answers --------------------------------------------------------

_PLAIN = frozenset(range(0x20, 0x7F)) - {ord("%")}
_HEX = b"0123456789ABCDEFabcdef"


def encode_grpc_message(text: str) -> bytes:
    """``text`` as a ``grpc-message`` value: its UTF-8 bytes, each outside 0x20-0x7E, and '%',
    percent-encoded (``%XX``)."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if byte in _PLAIN:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def decode_grpc_message(value: bytes) -> str:
    """A ``grpc-message`` value back to text. A '%' not followed by two hex digits is kept as
    it is, and bytes that are not UTF-8 become U+FFFD: a message is for people, it never
    fails a call."""
    out = bytearray()
    i, n = 0, len(value)
    while i < n:
        byte = value[i]
        if (byte == 0x25 and i + 2 < n and value[i + 1] in _HEX
                and value[i + 2] in _HEX):
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(byte)
            i += 1
    return out.decode("utf-8", errors="replace")


def trailers_only(grpc_status: int, message: str, extra: Iterable[Header] = ()) -> list[Header]:
    """The header list of a Trailers-Only response meshd answers a call with (sent as one
    HEADERS frame that ends the stream): HTTP 200, ``content-type: application/grpc``,
    ``grpc-status``, ``grpc-message`` when there is one, then ``extra`` (``x-meshd-error``,
    ``x-meshd-reason``)."""
    headers = [(b":status", b"200"), (b"content-type", CONTENT_TYPE),
               (GRPC_STATUS, str(int(grpc_status)).encode("ascii"))]
    if message:
        headers.append((GRPC_MESSAGE, encode_grpc_message(message)))
    headers.extend(extra)
    return headers

