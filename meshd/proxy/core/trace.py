"""Request identity carried across hops: ``X-Request-Id`` and W3C ``traceparent``. Pure.

Every hop (each meshd, outbound and inbound) keeps the request id it received, or makes one
(a random UUID-shaped hex string) when there is none; and for ``traceparent``
(``00-<trace id>-<parent span id>-<flags>``, W3C Trace Context level 1) keeps the trace id and
flags and puts a new span id of its own as the parent, so the next hop (and the app) see this
hop as their parent. A missing or malformed ``traceparent`` starts a new trace, sampled flag
off. ``tracestate`` is end to end and passes untouched.

This hop's span (``meshd.tracing``) is the one whose id is sent on: its parent is the span id
received (None for a trace this hop started). With a ``Sampler`` (tracing on), the sampled flag
sent on is this hop's decision: the sampler sees the trace id and the received flag (None for a
new trace), and only bit 0 of the flags changes. Without one, the flags pass unchanged.
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
SAMPLED = 0x01  # the sampled bit of the trace flags

# (trace id as 32 hex digits, the received sampled flag or None for a new trace) -> sampled
Sampler = Callable[[bytes, bool | None], bool]


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
    traceparent: bytes  # this hop's value, as sent on: 00-<trace id>-<this hop's span>-<flags>
    parent_span_id: bytes | None = None  # the span id received (hex); None: a new trace

    @property
    def trace_id(self) -> bytes:
        return self.traceparent[3:35]

    @property
    def span_id(self) -> bytes:
        return self.traceparent[36:52]

    @property
    def sampled(self) -> bool:
        return bool(int(self.traceparent[53:55], 16) & SAMPLED)

    @property
    def headers(self) -> tuple[Header, Header]:
        return ((REQUEST_ID, self.request_id.encode("ascii")), (TRACEPARENT, self.traceparent))


def identify(headers: Iterable[Header],
             random_bytes: Callable[[int], bytes] = random_bytes_batched, *,
             sample: Sampler | None = None) -> RequestIdentity:
    """The request id and this hop's ``traceparent`` for a request with ``headers``; with
    ``sample``, its sampled flag is the sampler's decision."""
    request_id: bytes | None = None
    parent: bytes | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == REQUEST_ID and request_id is None:
            request_id = value.strip()
        elif lower == TRACEPARENT:
            parent = value.strip().lower() if parent is None else b"invalid"  # twice: invalid
    if request_id is None and parent is None:
        # A request from outside the mesh (the usual first hop): a new id and a new trace,
        # from one fetch of random bytes in the order the general path takes them (id, span,
        # trace), without its calls per part.
        raw = random_bytes(40).hex()
        span, trace = raw[32:48].encode(), raw[48:].encode()
        if span.strip(b"0") and trace.strip(b"0"):
            flags = b"01" if sample is not None and sample(trace, None) else b"00"
            return RequestIdentity(
                f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:32]}",
                b"00-%s-%s-%s" % (trace, span, flags))
    if request_id is None or not _REQUEST_ID_RE.match(request_id):
        raw = random_bytes(16).hex()
        request_id = f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}".encode()
    traceparent, parent_span = continue_trace(parent, random_bytes, sample)
    return RequestIdentity(request_id.decode("ascii"), traceparent, parent_span)


def next_traceparent(received: bytes | None,
                     random_bytes: Callable[[int], bytes] = random_bytes_batched) -> bytes:
    return continue_trace(received, random_bytes)[0]


def continue_trace(received: bytes | None,
                   random_bytes: Callable[[int], bytes] = random_bytes_batched,
                   sample: Sampler | None = None) -> tuple[bytes, bytes | None]:
    """This hop's ``traceparent`` for the one ``received`` (None: none), and the span id
    received (None when this hop starts a new trace)."""
    span = _nonzero(random_bytes, 8)
    m = _TRACEPARENT_RE.match(received) if received else None
    if m is not None and m.group(1) != b"ff" and m.group(2) != _ZERO_TRACE \
            and m.group(3) != _ZERO_SPAN:
        # a version we do not know (not 00, not ff) is read as version 00 and sent on as such
        trace, flags = m.group(2), m.group(4)
        if sample is not None:
            bits = int(flags, 16)
            decided = sample(trace, bool(bits & SAMPLED))
            flags = b"%02x" % (bits | SAMPLED if decided else bits & ~SAMPLED)
        return b"00-%s-%s-%s" % (trace, span, flags), m.group(3)
    trace = _nonzero(random_bytes, 16)
    flags = b"01" if sample is not None and sample(trace, None) else b"00"
    return b"00-%s-%s-%s" % (trace, span, flags), None


def _nonzero(random_bytes: Callable[[int], bytes], size: int) -> bytes:
    while True:
        value = random_bytes(size).hex().encode("ascii")
        if value.strip(b"0"):
            return value
