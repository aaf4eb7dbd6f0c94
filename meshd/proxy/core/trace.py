"""Request identity carried across hops: ``X-Request-Id`` and W3C ``traceparent``. Pure.

Every hop (each meshd, outbound and inbound) keeps the request id it received, or makes one
(a random UUID-shaped hex string) when there is none; and for ``traceparent``
(``00-<trace id>-<parent span id>-<flags>``, W3C Trace Context level 1) keeps the trace id and
flags and puts a new span id of its own as the parent, so the next hop (and the app) see this
hop as their parent. A missing or malformed ``traceparent`` starts a new trace, sampled flag
off. ``tracestate`` is end to end and passes untouched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshd.proxy.core.http1 import Header

REQUEST_ID = b"x-request-id"
TRACEPARENT = b"traceparent"
MAX_REQUEST_ID = 200  # a longer one is replaced: it ends up in logs
_TRACEPARENT_RE = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# visible ASCII only: safe in any log line
_REQUEST_ID_RE = re.compile(rb"^[\x21-\x7e]{1,%d}$" % MAX_REQUEST_ID)
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_RANDOM_BATCH = 4096


class _RandomBytes:
    """Bytes from ``os.urandom``, fetched 4 KiB at a time: unpredictable ids (W3C Trace
    Context asks for random trace ids) without a getrandom() system call per request."""

    def __init__(self) -> None:
        self._buffer = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)  # a child must not reuse our bytes

    def _forget(self) -> None:
        self._buffer, self._at = b"", 0

    def __call__(self, size: int) -> bytes:
        if self._at + size > len(self._buffer):
            self._buffer, self._at = os.urandom(max(_RANDOM_BATCH, size)), 0
        chunk = self._buffer[self._at:self._at + size]
        self._at += size
        return chunk


random_bytes_batched = _RandomBytes()


@dataclass(frozen=True, slots=True)
class RequestIdentity:
    request_id: str
    traceparent: bytes  # this hop's value, as sent on

    @property
    def headers(self) -> tuple[Header, Header]:
        return ((REQUEST_ID, self.request_id.encode("ascii")), (TRACEPARENT, self.traceparent))


def identify(headers: Iterable[Header],
             random_bytes: Callable[[int], bytes] = random_bytes_batched) -> RequestIdentity:
    """The request id and this hop's ``traceparent`` for a request with ``headers``."""
    request_id: bytes | None = None
    parent: bytes | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == REQUEST_ID and request_id is None:
            request_id = value.strip()
        elif lower == TRACEPARENT:
            parent = value.strip().lower() if parent is None else b"invalid"  # twice: invalid
    if request_id is None or not _REQUEST_ID_RE.match(request_id):
        raw = random_bytes(16).hex()
        request_id = f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}".encode()
    return RequestIdentity(request_id.decode("ascii"), next_traceparent(parent, random_bytes))


def next_traceparent(received: bytes | None,
                     random_bytes: Callable[[int], bytes] = random_bytes_batched) -> bytes:
    span = _nonzero(random_bytes, 8)
    m = _TRACEPARENT_RE.match(received) if received else None
    if m is not None and m.group(1) != b"ff" and m.group(2) != _ZERO_TRACE \
            and m.group(3) != _ZERO_SPAN:
        # a version we do not know (not 00, not ff) is read as version 00 and sent on as such
        return b"00-%s-%s-%s" % (m.group(2), span, m.group(4))
    return b"00-%s-%s-00" % (_nonzero(random_bytes, 16), span)


def _nonzero(random_bytes: Callable[[int], bytes], size: int) -> bytes:
    while True:
        value = random_bytes(size).hex().encode("ascii")
        if value.strip(b"0"):
            return value
