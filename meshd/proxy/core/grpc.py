"""gRPC over the proxy: status codes, deadlines, and the answers meshd makes itself. Pure.

A gRPC call is an HTTP/2 POST whose ``content-type`` is ``application/grpc`` (or
``application/grpc+<codec>``); its outcome is the ``grpc-status`` trailer, or a header of a
Trailers-Only response (a HEADERS frame that ends the stream: what a server sends when it fails
before any message, and what meshd sends for its own errors, since a gRPC client cannot read an
HTTP error body).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

from meshd.proxy.core.http1 import Header


class Status(IntEnum):
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


# the names routes.toml's ``retry_on`` takes for gRPC statuses
RETRY_NAMES: dict[str, Status] = {
    "cancelled": Status.CANCELLED,
    "deadline-exceeded": Status.DEADLINE_EXCEEDED,
    "internal": Status.INTERNAL,
    "resource-exhausted": Status.RESOURCE_EXHAUSTED,
    "unavailable": Status.UNAVAILABLE,
}

CONTENT_TYPE = b"application/grpc"
GRPC_STATUS = b"grpc-status"
GRPC_MESSAGE = b"grpc-message"
GRPC_TIMEOUT = b"grpc-timeout"

_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def is_grpc(content_type: bytes | None) -> bool:
    """``application/grpc`` or ``application/grpc+proto`` (any codec) - not gRPC-Web, which
    is a different framing over HTTP/1.1 and passes as plain HTTP."""
    if not content_type:
        return False
    value = content_type.split(b";", 1)[0].strip().lower()
    return value == CONTENT_TYPE or value.startswith(CONTENT_TYPE + b"+")


def grpc_request(headers: Iterable[Header]) -> bool:
    return is_grpc(next((v for n, v in headers if n.lower() == b"content-type"), None))


def parse_grpc_timeout(value: bytes | None) -> float | None:
    """Seconds in a ``grpc-timeout`` value (1 to 8 digits and a unit), None when malformed."""
    if not value or len(value) > 9 or not value[:-1].isdigit():
        return None
    unit = _UNITS.get(value[-1:])
    return int(value[:-1]) * unit if unit is not None else None


def format_grpc_timeout(seconds: float) -> bytes:
    """The most precise ``grpc-timeout`` value for ``seconds`` that fits in 8 digits."""
    seconds = max(seconds, 0.0)
    for unit, scale in ((b"n", 1e-9), (b"u", 1e-6), (b"m", 1e-3), (b"S", 1.0), (b"M", 60.0)):
        amount = int(seconds / scale)
        if amount < 100_000_000:
            return b"%d%s" % (amount, unit)
    return b"%dH" % min(int(seconds / 3600.0), 99_999_999)


def effective_timeout(route: float | None, grpc: float | None) -> float | None:
    """The whole call's deadline: the client's, capped by the route's."""
    if route is None:
        return grpc
    return route if grpc is None else min(route, grpc)


def status_for_http(status: int) -> Status:
    """The gRPC status of an HTTP response that carries none (the gRPC spec's mapping)."""
    return {400: Status.INTERNAL, 401: Status.UNAUTHENTICATED, 403: Status.PERMISSION_DENIED,
            404: Status.UNIMPLEMENTED, 429: Status.UNAVAILABLE, 502: Status.UNAVAILABLE,
            503: Status.UNAVAILABLE, 504: Status.UNAVAILABLE}.get(status, Status.UNKNOWN)


def status_for_meshd_error(status: int, code: str = "") -> Status:
    """The gRPC status of an answer meshd makes itself (``code``: its ``x-meshd-error``)."""
    if status == 504 or (code.endswith("timeout") and status != 503):
        return Status.DEADLINE_EXCEEDED
    if status == 403:
        return Status.PERMISSION_DENIED
    if status in (413, 429):
        return Status.RESOURCE_EXHAUSTED
    if status in (502, 503):
        return Status.UNAVAILABLE
    return status_for_http(status)


def http_equivalent(status: int) -> int:
    """The HTTP status a gRPC outcome counts as for outlier detection and retry conditions
    (a failed call is still an HTTP 200)."""
    return _HTTP_EQUIVALENT.get(int(status), 200)


_HTTP_EQUIVALENT: dict[int, int] = {
    Status.OK: 200, Status.UNAVAILABLE: 503, Status.INTERNAL: 500, Status.UNKNOWN: 500,
    Status.DATA_LOSS: 500, Status.DEADLINE_EXCEEDED: 504, Status.RESOURCE_EXHAUSTED: 429,
    Status.UNIMPLEMENTED: 501}


def encode_grpc_message(text: str) -> bytes:
    """``grpc-message``: UTF-8, with bytes outside printable ASCII and ``%`` percent-encoded."""
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
                    for b in text.encode("utf-8"))


def decode_grpc_message(value: bytes) -> str:
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == 0x25 and i + 2 < len(value) + 0 and _hex(value[i + 1:i + 3]):
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(value[i])
            i += 1
    return out.decode("utf-8", "replace")


def _hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def grpc_status_of(headers: Iterable[Header]) -> int | None:
    """The ``grpc-status`` in a header or trailer list (None: absent or not a number)."""
    for name, value in headers:
        if name == GRPC_STATUS:
            return int(value) if value.isdigit() else None
    return None


def trailers_only(status: int, message: str, extra: Iterable[Header] = ()) -> list[Header]:
    """The header list of a Trailers-Only response carrying ``status`` and ``message``."""
    return [(b":status", b"200"), (b"content-type", CONTENT_TYPE),
            (GRPC_STATUS, b"%d" % status), (GRPC_MESSAGE, encode_grpc_message(message)),
            *extra]


def retries_on(retry_on: Iterable[str], status: int) -> bool:
    """Whether a route retrying on ``retry_on`` retries a call that ended with ``status``."""
    return any(RETRY_NAMES.get(name) == status for name in retry_on)
