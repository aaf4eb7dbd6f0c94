"""HTTP/2 framing for the proxy: the ``h2`` library's state machine behind limits, and the
translation between HTTP/2 header lists and the heads the rest of the proxy reads. Pure: bytes
in, events and bytes out, ``now`` passed in.

``Session`` is one connection, either side. ``feed`` gives it what came off the socket and
returns events per stream (``Opened`` a request or response head, ``Body``, ``Trailers``,
``Ended``, ``Reset``) and per connection (``Window``: send credit grew, ``GoingAway``,
``Failed``: a connection error, GOAWAY queued); ``outgoing`` takes the bytes to write.

Limits, enforced before anything reaches a handler (an HTTP/2 peer can make a server do much
work with little input):

* header lists: ``max_header_list_size`` decompressed (HPACK bombs), and at most 64 CONTINUATION
  frames per header block (the ``h2`` library's bound);
* memory: a stream's receive window is ``stream_window``, the connection's ``connection_window``;
  credit goes back to the peer only as the proxy consumes the bytes (``consumed``), so a peer
  can never have more than the connection window in flight, whatever its stream count
  (``POOL_LIMITS``, for the connections meshd opens, has room for every stream's window);
* streams: ``max_concurrent_streams`` open at once;
* floods: more than ``max_resets`` streams reset by the peer (rapid reset), or more than
  ``max_control`` PING/SETTINGS/empty DATA frames, within ``flood_window`` seconds, ends the
  connection with ``ENHANCE_YOUR_CALM``.

A protocol violation is a connection error: ``Failed`` with the GOAWAY the peer is sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

# only the error codes at import time: the rest of the h2 library (HPACK, the state machine:
# a few MB) is loaded by the first ``Session``, so a meshd whose services and peers speak only
# HTTP/1.1 never loads it. The methods below reach ``h2.events`` and ``h2.exceptions`` as
# attributes of the package, which they are once ``Session.__init__`` has imported them.
import h2.errors

if TYPE_CHECKING:
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions
    import h2.settings
    from hpack import Encoder

from meshd.proxy.core.http1 import Framing, Header, RequestHead, ResponseHead

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ALPN_H2 = "h2"

NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
INTERNAL_ERROR = h2.errors.ErrorCodes.INTERNAL_ERROR
REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM
CANCEL = h2.errors.ErrorCodes.CANCEL
ENHANCE_YOUR_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM

# the HPACK table our encoder keeps, however large a table the peer allows (its
# SETTINGS_HEADER_TABLE_SIZE): a larger one would hold every distinct field sent on a
# long-lived connection
ENCODER_TABLE_SIZE = 4096

# connection-specific fields HTTP/2 forbids (RFC 9113 8.2.2); ``te`` passes only as "trailers"
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                 b"transfer-encoding", b"upgrade", b"host"})


@dataclass(frozen=True, slots=True)
class Limits:
    max_concurrent_streams: int = 128
    max_header_list_size: int = 64 * 1024
    stream_window: int = 256 * 1024
    connection_window: int = 1024 * 1024
    max_frame_size: int = 16 * 1024
    max_resets: int = 200
    max_control: int = 1000
    flood_window: float = 10.0


DEFAULT_LIMITS = Limits()
# Connections meshd opens (pools) carry streams of unrelated callers. Their connection window
# is all their streams' windows together, so that a caller that stops reading, whose stream
# then holds its whole window unconsumed, cannot starve the others sharing the connection;
# memory stays bounded by streams x stream window.
POOL_LIMITS = Limits(connection_window=DEFAULT_LIMITS.max_concurrent_streams
                     * DEFAULT_LIMITS.stream_window)


# -- events ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Opened:
    """A request head (server side) or a final response head (client side)."""

    stream_id: int
    headers: list[Header]
    ended: bool  # END_STREAM came with it: no body


@dataclass(frozen=True, slots=True)
class Body:
    stream_id: int
    data: bytes
    flow: int  # flow-controlled bytes to give back (``consumed``) once the data is used


@dataclass(frozen=True, slots=True)
class Trailers:
    stream_id: int
    headers: list[Header]


@dataclass(frozen=True, slots=True)
class Ended:
    stream_id: int


@dataclass(frozen=True, slots=True)
class Reset:
    stream_id: int
    code: int
    remote: bool  # the peer reset it (False: we did, after a stream error)


@dataclass(frozen=True, slots=True)
class Window:
    """Send credit grew (stream 0: the connection's, or a settings change for all)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoingAway:
    """The peer sent GOAWAY: streams above ``last_stream_id`` were never processed."""

    last_stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class Failed:
    """A connection error: a GOAWAY with ``code`` is queued; write it and close."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class RequestTrailers:
    """Trailers at the end of a request body, as the proxy passes them on (an event of an
    HTTP/2 request's body, before its end)."""

    headers: list[Header]


StreamEvent = Opened | Body | Trailers | Ended | Reset
Event = StreamEvent | Window | GoingAway | Failed


class SendRefused(Exception):
    """The stream (or the connection) no longer takes what was to be sent on it."""


class _Rate:
    """How many things happened in the last ``window`` seconds (a fixed-window count)."""

    __slots__ = ("_count", "_start", "limit", "window")

    def __init__(self, window: float, limit: int) -> None:
        self.window = window
        self.limit = limit
        self._start = -window
        self._count = 0

    def over(self, now: float, n: int = 1) -> bool:
        if now - self._start >= self.window:
            self._start, self._count = now, 0
        self._count += n
        return self._count > self.limit


class _FrameHeads:
    """Frame headers read as the bytes come. The ``h2`` library looks at a frame's length only
    once the whole frame is in: a header announcing 16 MiB would be buffered to its end before
    being refused. This refuses it at its header, and a connection whose first frame is not
    SETTINGS (RFC 9113 3.4: an invalid preface), at that frame's header."""

    __slots__ = ("_first", "_head", "_magic", "_skip", "max_frame_size")

    def __init__(self, magic: bytes, max_frame_size: int) -> None:
        self._magic = magic  # what is still to come of the client's magic
        self._skip = 0  # octets of a frame's payload still to come
        self._head = bytearray()
        self._first = True
        self.max_frame_size = max_frame_size

    def check(self, data: bytes | bytearray) -> tuple[int, str] | None:
        """The connection error (code, reason) ``data`` shows, if any."""
        view = memoryview(data)
        while view:
            if self._magic:
                step = min(len(self._magic), len(view))
                if view[:step] != self._magic[:step]:
                    return PROTOCOL_ERROR, "invalid connection preface"
                self._magic = self._magic[step:]
                view = view[step:]
                continue
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            need = 9 - len(self._head)
            self._head += view[:need]
            view = view[need:]
            if len(self._head) < 9:
                return None
            length = int.from_bytes(self._head[:3], "big")
            kind, flags = self._head[3], self._head[4]
            self._head.clear()
            if self._first:
                self._first = False
                if kind != 0x4 or flags & 0x1:  # SETTINGS, not an ACK
                    return PROTOCOL_ERROR, "invalid connection preface: no SETTINGS first"
            if length > self.max_frame_size:
                return (h2.errors.ErrorCodes.FRAME_SIZE_ERROR,
                        f"frame of {length} octets, more than {self.max_frame_size}")
            self._skip = length
        return None


def _plain_encoder() -> Encoder:
    """An HPACK encoder without Huffman coding of the strings: in pure Python the coding is a
    third of a header list's encoding time (about 13 of 36 µs for a typical proxied request)
    for some 25 bytes saved, and the peer's decoding is cheaper too. The dynamic table still
    compresses what repeats. (Made by the first ``Session``: hpack loads with it.)"""
    from hpack import Encoder, HeaderTuple

    class PlainEncoder(Encoder):
        def encode(self, headers: Iterable[HeaderTuple | tuple[bytes | str, bytes | str]
                                           | tuple[bytes | str, bytes | str, bool | None]]
                   | dict[bytes | str, bytes | str], huffman: bool = True) -> bytes:
            return super().encode(headers, huffman=False)

    return PlainEncoder()


class Session:
    """One HTTP/2 connection's state (``client_side``: we opened it). Call ``start`` first."""

    def __init__(self, *, client_side: bool, limits: Limits = DEFAULT_LIMITS) -> None:
        self.client_side = client_side
        self.limits = limits
        import h2.config  # the first HTTP/2 connection loads these (see above)
        import h2.connection
        import h2.events
        import h2.exceptions
        import h2.settings
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                           # checked in one pass of ours
                                           # (``field_error``), not the library's seven
                                           validate_inbound_headers=False,
                                           normalize_inbound_headers=True,
                                           # what we send is normalized in one pass
                                           # (``outbound_fields``), not the library's ten
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.encoder = _plain_encoder()
        self._resets = _Rate(limits.flood_window, limits.max_resets)
        self._control = _Rate(limits.flood_window, limits.max_control)
        self.failed: Failed | None = None
        self._extra: list[bytes] = []  # frames written by hand (a graceful GOAWAY)
        self.going_away = False  # we sent GOAWAY: no new streams
        self.peer_going_away: GoingAway | None = None
        self.last_peer_stream = 0  # highest stream the peer opened (server side)
        self._heads = _FrameHeads(b"" if client_side else PREFACE, limits.max_frame_size)

    def start(self) -> None:
        """Queue our preface: settings (and the client's magic) and the connection window."""
        limits = self.limits
        codes = h2.settings.SettingCodes
        values = {codes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                  codes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
                  codes.INITIAL_WINDOW_SIZE: limits.stream_window,
                  codes.MAX_FRAME_SIZE: limits.max_frame_size}
        if self.client_side:
            values[codes.ENABLE_PUSH] = 0
        # as initial values (not changes): the first SETTINGS frame carries them, and the
        # library's flow control counts with them from the start
        self._h2.local_settings = h2.settings.Settings(client=self.client_side,
                                                       initial_values=values)
        self._h2.max_inbound_frame_size = limits.max_frame_size
        self._h2.initiate_connection()
        # the h2 library applies its own limits once the peer acknowledges them; these hold
        # from the first frame
        self._h2.decoder.max_header_list_size = limits.max_header_list_size
        grow = limits.connection_window - 65535
        if grow > 0:
            self._h2.increment_flow_control_window(grow)

    # -- input ---------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray, now: float) -> list[Event]:
        """Take bytes from the peer; the events they make (after a ``Failed``, nothing more)."""
        if self.failed is not None:
            return []
        bad = self._heads.check(data)
        if bad is not None:
            return [self._fail(*bad)]
        try:
            raw = self._h2.receive_data(data)
        except h2.exceptions.DenialOfServiceError as exc:
            return [self._fail(ENHANCE_YOUR_CALM, f"header list too large: {exc}")]
        except h2.exceptions.FlowControlError as exc:
            return [self._fail(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR, str(exc))]
        except h2.exceptions.FrameTooLargeError as exc:
            return [self._fail(h2.errors.ErrorCodes.FRAME_SIZE_ERROR, str(exc))]
        except h2.exceptions.ProtocolError as exc:
            code = getattr(exc, "error_code", PROTOCOL_ERROR) or PROTOCOL_ERROR
            return [self._fail(code, str(exc) or type(exc).__name__)]
        return self._translate(raw, len(data), now)

    def _translate(self, raw: Sequence[h2.events.Event], size: int, now: float) -> list[Event]:
        out: list[Event] = []
        for ev in raw:
            if isinstance(ev, (h2.events.RequestReceived, h2.events.ResponseReceived)):
                bad = field_error(ev.headers or (), RESPONSE if self.client_side else REQUEST)
                if bad is not None:
                    return [self._fail(PROTOCOL_ERROR, f"malformed header block: {bad}")]
                if ev.stream_id > self.last_peer_stream and not self.client_side:
                    self.last_peer_stream = ev.stream_id
                out.append(Opened(ev.stream_id, list(ev.headers or ()),
                                  ev.stream_ended is not None))
            elif isinstance(ev, h2.events.DataReceived):
                data = ev.data or b""
                if not data and ev.stream_ended is None and self._control.over(now):
                    return [self._fail(ENHANCE_YOUR_CALM, "flood of empty DATA frames")]
                out.append(Body(ev.stream_id, data, ev.flow_controlled_length or 0))
            elif isinstance(ev, h2.events.TrailersReceived):
                bad = field_error(ev.headers or (), TRAILERS)
                if bad is not None:
                    return [self._fail(PROTOCOL_ERROR, f"malformed trailers: {bad}")]
                out.append(Trailers(ev.stream_id, list(ev.headers or ())))
            elif isinstance(ev, h2.events.StreamEnded):
                out.append(Ended(ev.stream_id))
            elif isinstance(ev, h2.events.StreamReset):
                remote = bool(ev.remote_reset)
                if remote and not self.client_side and self._resets.over(now):
                    return [self._fail(ENHANCE_YOUR_CALM,
                                       f"more than {self.limits.max_resets} streams reset "
                                       f"within {self.limits.flood_window:g}s (rapid reset)")]
                out.append(Reset(ev.stream_id, int(ev.error_code or 0), remote))
            elif isinstance(ev, h2.events.WindowUpdated):
                out.append(Window(ev.stream_id))
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                if self._control.over(now):
                    return [self._fail(ENHANCE_YOUR_CALM, "flood of SETTINGS frames")]
                encoder = self._h2.encoder
                if encoder.header_table_size > ENCODER_TABLE_SIZE:
                    encoder.header_table_size = ENCODER_TABLE_SIZE
                out.append(Window(0))  # the initial window may have grown
            elif isinstance(ev, h2.events.PingReceived):
                if self._control.over(now):
                    return [self._fail(ENHANCE_YOUR_CALM, "flood of PING frames")]
            elif isinstance(ev, h2.events.ConnectionTerminated):
                gone = GoingAway(int(ev.last_stream_id or 0), int(ev.error_code or 0))
                self.peer_going_away = gone
                out.append(gone)
            # informational responses, priority, acks, unknown frames: nothing to do
        return out

    def _fail(self, code: int, reason: str) -> Failed:
        self.failed = Failed(int(code), reason)
        try:
            self._h2.close_connection(error_code=code,
                                      last_stream_id=self.last_peer_stream or None)
        except h2.exceptions.ProtocolError:
            pass  # already closed: nothing more to say
        self.going_away = True
        return self.failed

    def consumed(self, stream_id: int, flow: int) -> None:
        """``flow`` bytes of ``stream_id`` were used: give the credit back (window updates
        are batched by the library: once half a window was used)."""
        if flow <= 0 or self.failed is not None:
            return
        try:  # a closed stream's share still comes back to the connection
            self._h2.acknowledge_received_data(flow, stream_id)
        except h2.exceptions.ProtocolError:
            pass

    # -- output --------------------------------------------------------------------------------

    def outgoing(self) -> bytes:
        data = self._h2.data_to_send()
        if self._extra:
            data, self._extra = data + b"".join(self._extra), []
        return data

    def next_stream_id(self) -> int:
        return self._h2.get_next_available_stream_id()

    def send_headers(self, stream_id: int, headers: Sequence[Header], *,
                     end: bool = False) -> None:
        """Raises ``SendRefused`` when the stream or the connection is closed."""
        try:
            self._h2.send_headers(stream_id, outbound_fields(headers), end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            raise SendRefused(str(exc) or type(exc).__name__) from exc

    def send_window(self, stream_id: int) -> int:
        """How many body bytes may be sent on ``stream_id`` now (one frame at most)."""
        try:
            window = self._h2.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return 0
        return min(window, self._h2.max_outbound_frame_size)

    def send_data(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        """Send ``data`` (at most ``send_window`` bytes); raises ``SendRefused``."""
        try:
            self._h2.send_data(stream_id, data, end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            raise SendRefused(str(exc) or type(exc).__name__) from exc

    def end_stream(self, stream_id: int) -> None:
        """Raises ``SendRefused``."""
        try:
            self._h2.end_stream(stream_id)
        except h2.exceptions.ProtocolError as exc:
            raise SendRefused(str(exc) or type(exc).__name__) from exc

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        try:
            self._h2.reset_stream(stream_id, error_code=code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError,
                h2.exceptions.ProtocolError):
            pass  # closed already: nothing to reset

    def goaway(self) -> None:
        """Say, gracefully, that no new stream will be taken: the streams up to the last one
        the peer opened go on (the frame is written by hand: the library's GOAWAY would end
        them all)."""
        if self.going_away:
            return
        self.going_away = True
        import hyperframe.frame  # loaded with h2.connection already
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = self.last_peer_stream
        frame.error_code = NO_ERROR
        self._extra.append(frame.serialize())

    def stream_open(self, stream_id: int) -> bool:
        stream = self._h2.streams.get(stream_id)
        return stream is not None and not stream.closed

    @property
    def peer_max_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    @property
    def open_streams(self) -> int:
        h = self._h2
        return h.open_outbound_streams + h.open_inbound_streams


# -- heads -------------------------------------------------------------------------------------


def request_head(headers: Sequence[Header], ended: bool) -> RequestHead:
    """The proxy's view of an HTTP/2 request (``field_error`` has checked the block):
    ``:authority`` becomes ``host`` (first) unless a ``host`` field is there, the body framed
    by its ``content-length`` or, without one, as a stream (chunked, when sent on as
    HTTP/1.1). Raises ``ValueError`` for what the proxy cannot carry (CONNECT)."""
    method = path = authority = b""
    fields: list[Header] = []
    length: int | None = None
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise ValueError("invalid content-length") from None
        fields.append((name, value))
    if method == b"CONNECT":
        raise ValueError("CONNECT is not proxied")
    if not any(n == b"host" for n, _ in fields) and authority:
        fields.insert(0, (b"host", authority))
    if ended:
        framing, length = Framing.NONE, None
    elif length is not None:
        framing = Framing.LENGTH
    else:
        framing = Framing.CHUNKED
    return RequestHead(method, path, "2", tuple(fields), True, framing, length)


def response_head(headers: Sequence[Header], ended: bool, request_method: bytes) -> ResponseHead:
    """The proxy's view of an HTTP/2 response head."""
    status = 0
    fields: list[Header] = []
    length: int | None = None
    for name, value in headers:
        if name == b":status":
            status = int(value)
        elif name[:1] != b":":
            if name == b"content-length":
                length = int(value) if value.isdigit() else None
            fields.append((name, value))
    if ended or request_method == b"HEAD" or status in (204, 304):
        framing = Framing.NONE
    elif length is not None:
        framing = Framing.LENGTH
    else:
        framing = Framing.CHUNKED
    return ResponseHead(status, b"", "2", tuple(fields), True, framing, length)


# -- header blocks received -------------------------------------------------------------------

REQUEST, RESPONSE, TRAILERS = 0, 1, 2
# octets a field name may not hold (RFC 9113 8.2.1): controls, space, colon (but a
# pseudo-header's first), uppercase, DEL and above
_BAD_NAME = re.compile(rb"[^\x21-\x39\x3b-\x40\x5b-\x7e]")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_FORBIDDEN = CONNECTION_SPECIFIC - {b"host"}
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":status", b":protocol"})
_REQUEST_PSEUDO = _PSEUDO - {b":status"}


def field_error(headers: Iterable[Header], kind: int) -> str | None:
    """What makes a received header block malformed (RFC 9113 8.2 and 8.3), or None: a
    field name empty or with an illegal octet, a value with NUL, CR or LF or surrounding
    whitespace, a connection-specific field, ``te`` other than "trailers", pseudo-headers
    duplicated, unknown, after a regular field, in trailers or of the other direction, a
    request without ``:method``, ``:scheme`` or a non-empty ``:path`` (CONNECT: the
    reverse), neither ``:authority`` nor ``host``, or the two differing, or two ``host``."""
    pseudo: dict[bytes, bytes] = {}
    regular = False
    host: bytes | None = None
    for name, value in headers:
        if not name:
            return "empty field name"
        if name[0] == 0x3A:  # ':'
            if regular:
                return f"pseudo-header {name!r} after a regular field"
            if name in pseudo:
                return f"duplicate pseudo-header {name!r}"
            if name not in _PSEUDO:
                return f"unknown pseudo-header {name!r}"
            pseudo[name] = value
        else:
            regular = True
            if _BAD_NAME.search(name) is not None:
                return f"illegal octet in field name {name!r}"
            if name in _FORBIDDEN:
                return f"connection-specific field {name!r}"
            if name == b"te" and value.lower() != b"trailers":
                return f"te: {value!r}"
            if name == b"host":
                if host is not None:
                    return "two host fields"
                host = value
        if value and (_BAD_VALUE.search(value) is not None or value[0] in (0x20, 0x09)
                      or value[-1] in (0x20, 0x09)):
            return f"illegal value of {name!r}"
    if kind == TRAILERS:
        return f"pseudo-headers in trailers: {sorted(pseudo)}" if pseudo else None
    if kind == RESPONSE:
        if b":status" not in pseudo or len(pseudo) > 1:
            return f"response pseudo-headers {sorted(pseudo)}"
        return None
    if b":status" in pseudo or b":method" not in pseudo:
        return f"request pseudo-headers {sorted(pseudo)}"
    method = pseudo[b":method"]
    if method == b"CONNECT" and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            return "CONNECT with :scheme or :path"
    else:
        if b":scheme" not in pseudo or not pseudo.get(b":path"):
            return "request without :scheme or :path"
        if b":protocol" in pseudo and method != b"CONNECT":
            return ":protocol without CONNECT"
    authority = pseudo.get(b":authority")
    if authority is None and host is None:
        return "neither :authority nor host"
    if authority is not None and host is not None and authority != host:
        return ":authority and host differ"
    return None


# -- header lists sent -------------------------------------------------------------------------

# fields kept out of the HPACK dynamic table (a compression side channel could reveal them)
SECRET_FIELDS = frozenset({b"authorization", b"proxy-authorization"})
# connection-specific fields a header list sent on HTTP/2 must not carry (``host`` is left to
# the builders: a request's becomes ``:authority``)
_NOT_SENT = CONNECTION_SPECIFIC - {b"host"}


def outbound_fields(headers: Iterable[Header]) -> list[Header]:
    """A header list as it is sent: names lowercased, values without surrounding
    whitespace, no connection-specific field (``te`` only as "trailers"), credentials and
    short cookies never indexed. Pseudo-headers come first from the builders below."""
    from hpack import NeverIndexedHeaderTuple  # (loaded with the connection's Session)

    out: list[Header] = []
    for name, value in headers:
        name = name.lower()
        if name in _NOT_SENT or (name == b"te" and value.lower() != b"trailers"):
            continue
        value = value.strip()
        if name in SECRET_FIELDS or (name == b"cookie" and len(value) < 20):
            out.append(NeverIndexedHeaderTuple(name, value))
        else:
            out.append((name, value))
    return out


def _h2_fields(headers: Iterable[Header], *, keep_length: bool) -> list[Header]:
    out: list[Header] = []
    for name, value in headers:
        lower = name.lower()
        if lower in CONNECTION_SPECIFIC or lower == b"te":
            continue
        if lower == b"content-length" and not keep_length:
            continue
        out.append((lower, value))
    return out


def request_fields(method: bytes, target: bytes, headers: Sequence[Header], *,
                   scheme: bytes = b"http", trailers: bool = False,
                   length: int | None = None) -> list[Header]:
    """An HTTP/2 request header list from end-to-end fields (``host`` becomes
    ``:authority``); ``trailers``: the client accepts trailers (``te: trailers``, which gRPC
    servers ask for)."""
    authority = next((v for n, v in headers if n.lower() == b"host"), b"")
    out: list[Header] = [(b":method", method), (b":scheme", scheme), (b":path", target or b"/")]
    if authority:
        out.insert(2, (b":authority", authority))
    out += _h2_fields(headers, keep_length=False)
    if length is not None:
        out.append((b"content-length", b"%d" % length))
    if trailers:
        out.append((b"te", b"trailers"))
    return out


def response_fields(status: int, headers: Iterable[Header], *,
                    length: int | None = None) -> list[Header]:
    """An HTTP/2 response header list from end-to-end fields."""
    out: list[Header] = [(b":status", b"%d" % status)]
    out += _h2_fields(headers, keep_length=False)
    if length is not None:
        out.append((b"content-length", b"%d" % length))
    return out


def wants_trailers(headers: Iterable[Header]) -> bool:
    """Whether a request's ``te`` says its client takes trailers."""
    return any(n.lower() == b"te" and b"trailers" in v.lower() for n, v in headers)


def trailer_fields(headers: Iterable[Header]) -> list[Header]:
    """Trailer fields fit to send on: no pseudo-headers, nothing connection-specific."""
    return [(n.lower(), v) for n, v in headers
            if n[:1] != b":" and n.lower() not in CONNECTION_SPECIFIC]
