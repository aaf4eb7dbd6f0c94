"""HTTP/1.1 framing for the data plane. Pure: bytes in, events out; no I/O.

httptools (llhttp) does the byte-level parsing; this module turns its callbacks into small
events (``RequestHead``/``ResponseHead``, ``Data``, ``END``), decides how each body is framed on
the way in and on the way out (``http1_write`` re-serialises). The trio shells feed it what
they read and write what it returns, so every decision here is testable a byte at a time.

Two llhttp traits shape the readers:

* ``should_keep_alive()`` is only meaningful inside a callback, so it is read in
  ``on_headers_complete`` / ``on_message_complete`` and stored on the event.
* httptools never tells llhttp that a response answers a HEAD request, so for HEAD (and for
  204/304, which llhttp knows about) the reader ends the message itself at the end of the head.
* An upgrade (``Connection: upgrade`` + ``Upgrade``) stops llhttp after the request (and after a
  101 response): whatever follows is no longer HTTP. The readers keep those bytes (``tail``) for
  the shell, which either tunnels them (101) or closes the connection after the response.

Smuggling defences on top of llhttp's own (which refuses Content-Length with
Transfer-Encoding, duplicate Content-Length, bad chunk sizes, obs-fold and bare CR/LF): a
request's Transfer-Encoding must be exactly ``chunked`` and only on HTTP/1.1. A framing error
found in a body is kept and raised before any further read (``pending_error``), so a shell
never waits on a client for bytes that could not be parsed anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import httptools

from meshd.errors import ProxyError

Header = tuple[bytes, bytes]

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128


class ProtocolError(ProxyError):
    """The peer sent something that is not acceptable HTTP/1.1. ``status`` is what a server
    answers it with (400, 431, 501...) before closing the connection."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class NoResponse(ProtocolError):
    """The upstream closed the connection before sending a single byte of a response: on a
    reused keep-alive connection this is the server having timed it out, not a bad answer."""


class Framing(Enum):
    NONE = "none"  # no body at all
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"  # Transfer-Encoding: chunked
    CLOSE = "close"  # the body ends when the connection does (responses only)


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: str  # "1.1" or "1.0"
    headers: tuple[Header, ...]
    keep_alive: bool
    framing: Framing
    content_length: int | None = None
    upgrade: bool = False  # asked for a protocol switch (Connection: upgrade + Upgrade)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: str
    headers: tuple[Header, ...]
    keep_alive: bool
    framing: Framing
    content_length: int | None = None

    @property
    def informational(self) -> bool:
        """A 1xx that another response follows (101 ends the exchange: it switches)."""
        return 100 <= self.status < 200 and self.status != 101


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    pass


END = EndOfMessage()
Event = RequestHead | ResponseHead | Data | EndOfMessage


# ------------------------------------------------------------------------------------------
# header helpers


def header_values(headers: Iterable[Header], name: bytes) -> list[bytes]:
    """Every value of header ``name`` (lower-case), in order."""
    return [v for n, v in headers if n.lower() == name]


_FRAMING_NAMES = frozenset({b"transfer-encoding", b"content-length", b"host"})


class FramingFields:
    """The values of the headers that decide framing, gathered in one pass (a reader fills
    it header by header as llhttp reports them)."""

    __slots__ = ("content_length", "hosts", "transfer_encoding")

    def __init__(self) -> None:
        self.transfer_encoding: list[bytes] = []
        self.content_length: list[bytes] = []
        self.hosts = 0

    def add(self, name: bytes, value: bytes) -> None:
        """Note one header field if it is one of the framing ones."""
        lower = name.lower()
        if lower not in _FRAMING_NAMES:
            return
        if lower == b"transfer-encoding":
            self.transfer_encoding.append(value)
        elif lower == b"content-length":
            self.content_length.append(value)
        else:
            self.hosts += 1

    @classmethod
    def scan(cls, headers: Iterable[Header]) -> FramingFields:
        fields = cls()
        for name, value in headers:
            fields.add(name, value)
        return fields


def _content_length(values: Sequence[bytes]) -> int | None:
    if not values:
        return None
    if len(values) == 1:  # the usual case: one plain number
        raw = values[0]
        if raw.isdigit() and len(raw) <= 18:
            return int(raw)
    parsed = {v.strip() for value in values for v in value.split(b",")}
    if len(parsed) != 1:
        raise ProtocolError("conflicting Content-Length values")
    (raw,) = parsed
    if not raw.isdigit() or len(raw) > 18:
        raise ProtocolError(f"invalid Content-Length {raw[:20]!r}")
    return int(raw)


def request_framing(headers: Sequence[Header] | FramingFields, version: str = "1.1"
                    ) -> tuple[Framing, int | None]:
    """How a request body is delimited (llhttp has already refused TE+CL). Transfer-Encoding
    must be exactly ``chunked`` (RFC 9112 6.1: a final coding other than chunked is a 400; other
    codings we cannot pass on are a 501) and HTTP/1.0 cannot have it at all."""
    fields = headers if isinstance(headers, FramingFields) else FramingFields.scan(headers)
    codings = fields.transfer_encoding
    if codings:
        tokens = [t.strip().lower() for v in codings for t in v.split(b",")]
        if version != "1.1":
            raise ProtocolError("Transfer-Encoding in an HTTP/1.0 request")
        if tokens[-1] != b"chunked" or tokens.count(b"chunked") != 1:
            raise ProtocolError("invalid Transfer-Encoding (the final coding must be chunked)")
        if len(tokens) != 1:
            raise ProtocolError("transfer codings other than chunked are not supported", 501)
        return Framing.CHUNKED, None
    if not fields.content_length:  # most requests: no body
        return Framing.NONE, None
    return Framing.LENGTH, _content_length(fields.content_length)


def response_framing(status: int, request_method: bytes,
                     headers: Sequence[Header] | FramingFields) -> tuple[Framing, int | None]:
    """How a response body is delimited (RFC 9112 6.3)."""
    if request_method == b"HEAD" or 100 <= status < 200 or status in (204, 304):
        return Framing.NONE, None
    fields = headers if isinstance(headers, FramingFields) else FramingFields.scan(headers)
    codings = fields.transfer_encoding
    if codings:
        last = codings[-1].split(b",")[-1].strip().lower()
        return (Framing.CHUNKED, None) if last == b"chunked" else (Framing.CLOSE, None)
    length = _content_length(fields.content_length)
    if length is None:
        return Framing.CLOSE, None
    return Framing.LENGTH, length


def downstream_framing(response: ResponseHead, request: RequestHead) -> Framing:
    """How to frame ``response`` towards the client that sent ``request``: a close-delimited
    body becomes chunked for an HTTP/1.1 client (so its connection survives), and an HTTP/1.0
    client, which cannot read chunked, gets a close-delimited one."""
    if request.version != "1.1" and response.framing is Framing.CHUNKED:
        return Framing.CLOSE
    if request.version == "1.1" and response.framing is Framing.CLOSE:
        return Framing.CHUNKED
    return response.framing


# ------------------------------------------------------------------------------------------
# readers


class _Stop(Exception):
    """Raised inside a callback to stop llhttp: the rest of the buffer belongs to no message."""


class _Reader:
    """What request and response readers share: accumulating a head within size limits,
    body events, and turning httptools errors into ``ProtocolError`` at one place."""

    too_large_status = 431

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._headers: list[Header] = []
        self._fields = FramingFields()
        self._head_bytes = 0
        self._in_head = False
        self._in_message = False
        self._error: ProtocolError | None = None
        self.tail = bytearray()  # bytes after an upgrade: not HTTP
        self.upgraded = False

    @property
    def pending_error(self) -> ProtocolError | None:
        """An error found after the events already returned: raised by the next ``feed``."""
        return self._error

    # httptools callbacks shared by both directions (each reader has its own
    # ``on_message_begin``)
    def on_header(self, name: bytes, value: bytes) -> None:
        # the head size check and FramingFields.add written out: llhttp calls this for
        # every field
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ProtocolError("message head too large", self.too_large_status)
        if not self._in_head:
            return  # a chunked trailer: dropped (trailers are not forwarded yet)
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            raise ProtocolError("too many header fields", self.too_large_status)
        headers.append((name, value))
        lower = name.lower()
        if lower in _FRAMING_NAMES:
            fields = self._fields
            if lower == b"transfer-encoding":
                fields.transfer_encoding.append(value)
            elif lower == b"content-length":
                fields.content_length.append(value)
            else:
                fields.hosts += 1

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(body))

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _run(self, parser: httptools.HttpRequestParser | httptools.HttpResponseParser,
             data: bytes | bytearray) -> list[Event]:
        """Feed ``data``; an error after complete events is kept for the next call, so a good
        request followed by garbage is still served before the connection is refused."""
        if self._error is not None:
            raise self._error
        if self.upgraded:
            self.tail += data
            return []
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # llhttp stops after an upgrade request / a 101: the rest is the new protocol.
            self.upgraded = True
            self.tail += data[int(upgrade.args[0]):]
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if not isinstance(cause, _Stop):
                self._error = (cause if isinstance(cause, ProtocolError)
                               else ProtocolError(f"malformed HTTP: {exc}"))
        events = self._take()
        if self._error is not None and not events:
            raise self._error
        return events


class RequestReader(_Reader):
    """Server side of a connection: bytes from a client in, request events out. Pipelined
    requests simply follow each other in the event list."""

    def __init__(self) -> None:
        super().__init__()
        self._target = bytearray()
        self._parser = httptools.HttpRequestParser(self)

    @property
    def mid_message(self) -> bool:
        return self._in_message

    def feed(self, data: bytes | bytearray) -> list[Event]:
        return self._run(self._parser, data)

    def feed_eof(self) -> list[Event]:
        """The client closed its side. Between requests that is the normal end of a
        keep-alive connection; inside one it is an aborted request."""
        if self._error is not None:
            raise self._error
        if self._in_message and not self.upgraded:
            raise ProtocolError("connection closed in the middle of a request")
        return []

    def on_message_begin(self) -> None:
        # _Reader.on_message_begin written out (as in ``on_url``, ``on_status``, ``on_body``
        # of the readers: llhttp calls these for every message, a call fewer each)
        self._headers = []
        self._fields = FramingFields()
        self._head_bytes = 0
        self._in_head = True
        self._in_message = True
        self._target = bytearray()

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ProtocolError("message head too large", self.too_large_status)
        self._target += url

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        method = p.get_method()
        headers = tuple(self._headers)
        version = p.get_http_version()
        if method == b"CONNECT":
            raise ProtocolError("CONNECT is not supported on a mesh listener", 405)
        if version == "1.1" and self._fields.hosts != 1:
            raise ProtocolError("an HTTP/1.1 request needs exactly one Host header")
        framing, length = request_framing(self._fields, version)
        upgrade = p.should_upgrade()
        if upgrade and framing is not Framing.NONE:
            raise ProtocolError("an Upgrade request with a body is not supported", 501)
        self._events.append(RequestHead(
            method=method, target=bytes(self._target), version=version, headers=headers,
            keep_alive=p.should_keep_alive(), framing=framing, content_length=length,
            upgrade=upgrade))

    def on_message_complete(self) -> None:
        self._in_message = False
        self._events.append(END)


class ResponseReader(_Reader):
    """Client side of one exchange: the bytes of the response to one request in, events out.

    1xx heads come out as their own events (without ``END``); the final response ends with
    ``END``. After that ``done`` is true, ``keep_alive`` says whether the connection may carry
    another request, and ``extra`` whether the server sent bytes after the response (then it
    may not)."""

    too_large_status = 502

    def __init__(self, request_method: bytes, upgrade: bool = False) -> None:
        super().__init__()
        self._method = request_method
        self._upgrade = upgrade  # the request asked for a protocol switch: a 101 may come
        self._reason = bytearray()
        self._framing = Framing.NONE
        self._received = False
        self.done = False
        self.keep_alive = False
        self.extra = False
        self._parser = httptools.HttpResponseParser(self)

    @property
    def received(self) -> bool:
        """Whether any byte of a response came."""
        return self._received

    def next_response(self, request_method: bytes, upgrade: bool = False) -> ResponseReader:
        """A reader for the response to the next request on the same connection: this one,
        reset, when its response ended cleanly where llhttp saw it end too (its parser waits
        at a message boundary: a keep-alive response read to its end, nothing after it); else
        a new one (a HEAD response, whose body llhttp still expects, an upgrade, an error).
        Resetting costs about a third of building a reader and its parser."""
        if not (self.done and self.keep_alive and not self._in_message and not self.extra
                and not self.upgraded and self._error is None and not self._events):
            return ResponseReader(request_method, upgrade)
        self._method = request_method
        self._upgrade = upgrade
        self._framing = Framing.NONE
        self._received = False
        self.done = False
        self.keep_alive = False
        return self

    def feed(self, data: bytes | bytearray) -> list[Event]:
        if not data:
            return []
        if self.done:
            if self.upgraded:
                self.tail += data
            else:
                self.extra = True
            return []
        self._received = True
        return self._run(self._parser, data)

    def feed_eof(self) -> list[Event]:
        if self._error is not None:
            raise self._error
        if self.done:
            return []
        if not self._received:
            raise NoResponse("the upstream closed the connection without responding")
        if not self._in_head and self._in_message and self._framing is Framing.CLOSE:
            self.done, self.keep_alive = True, False
            return [END]
        raise ProtocolError("the upstream closed the connection in the middle of a response")

    def on_message_begin(self) -> None:
        if self.done:
            self.extra = True
            raise _Stop
        self._headers = []
        self._fields = FramingFields()
        self._head_bytes = 0
        self._in_head = True
        self._in_message = True
        self._reason = bytearray()

    def on_status(self, reason: bytes) -> None:
        self._head_bytes += len(reason)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ProtocolError("message head too large", self.too_large_status)
        self._reason += reason

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        status = p.get_status_code()
        if status == 101 and not self._upgrade:
            raise ProtocolError("the upstream switched protocols without being asked")
        headers = tuple(self._headers)
        framing, length = response_framing(status, self._method, self._fields)
        self._framing = framing
        head = ResponseHead(status=status, reason=bytes(self._reason),
                            version=p.get_http_version(), headers=headers,
                            keep_alive=p.should_keep_alive(), framing=framing,
                            content_length=length)
        self._events.append(head)
        if status == 101:
            # Switched: the head is the whole response; llhttp then stops (``tail``).
            self.done, self.keep_alive = True, False
            self._events.append(END)
        elif framing is Framing.NONE and not head.informational:
            # HEAD/204/304: complete at the end of the head, whatever llhttp expects next.
            self.done, self.keep_alive = True, head.keep_alive
            self._events.append(END)

    def on_body(self, body: bytes) -> None:
        if self.done:
            self.extra = True
            raise _Stop
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        self._in_message = False
        if self.done or 100 <= self._parser.get_status_code() < 200:
            return
        self.done, self.keep_alive = True, self._parser.should_keep_alive()
        self._events.append(END)
