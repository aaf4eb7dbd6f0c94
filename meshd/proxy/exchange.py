"""One HTTP/1.1 request/response exchange over two streams: the trio shell around ``http1``.

The request body streams up while the response streams back, concurrently, so a server that
answers before reading the whole body (or never reads it) cannot deadlock us, and nothing is
buffered beyond one read: each side reads again only once its last write went out.

An upgrade request (WebSocket) answered 101 becomes a tunnel: the 101 goes to the client, then
bytes are pumped both ways (those each reader already held after the heads first) until both
sides end; neither connection carries HTTP again. An upgrade answered otherwise is relayed as a
normal response and the client's connection closed after it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

import trio

from meshd.errors import ProxyError
from meshd.proxy.core.attempt import pooled_dead, reusable, stale
from meshd.proxy.core.h2 import RequestTrailers
from meshd.proxy.core.http1 import (
    END,
    Data,
    Event,
    Framing,
    Header,
    NoResponse,
    ProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    downstream_framing,
)
from meshd.proxy.core.http1_write import (
    encode_data,
    encode_end,
    end_to_end,
    serialize_response,
)
from meshd.proxy.pump import pump

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ClientGone(ProxyError):
    """The downstream connection failed or was closed mid-exchange."""


class UpstreamFailed(ProxyError):
    """The upstream connection failed. ``pooled_dead`` marks a reused connection that failed
    before a byte of an answer came (the server had closed it: its other idle ones are likely
    closed too); ``stale`` is that, for a request that can be sent again as it was (no body):
    safe to retry on a fresh connection."""

    def __init__(self, message: str, stale: bool = False, pooled_dead: bool = False,
                 malformed: bool = False) -> None:
        super().__init__(message)
        self.stale = stale
        self.pooled_dead = pooled_dead or stale
        self.malformed = malformed  # it answered garbage rather than breaking off


class RequestSource:
    """The request direction of a client connection: one event at a time, reading (and so
    accepting more bytes from the client) only when the previous events are used up.

    ``message_done`` is true once the current request's ``END`` has been taken.
    ``body_limit``, set by a handler after the head, bounds the current request's body: a
    longer one raises ``ProtocolError`` (413) instead of its next ``Data``."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = RequestReader()
        self.message_done = True
        self.body_limit: int | None = None
        self._body_bytes = 0
        self._events: deque[Event] = deque()
        self._eof = False
        # the stream's read without waiting (sockio, streams), if it has one
        self._receive_nowait: Callable[[int], bytes | None] | None = getattr(
            stream, "receive_nowait", None)

    @property
    def has_input(self) -> bool:
        """Whether something of a next request is already here (or the end of the stream)."""
        return (bool(self._events) or self._eof or self.reader.mid_message
                or self.reader.pending_error is not None)

    @property
    def has_event(self) -> bool:
        """Whether ``next_event`` can answer without reading (an event, the end of the
        stream, or an error to raise)."""
        return bool(self._events) or self._eof or self.reader.pending_error is not None

    def fill_nowait(self) -> bool:
        """Read and parse what the client already sent, without waiting; False when nothing
        was there (or the stream cannot tell: it has no ``receive_nowait``). Raises like
        ``next_event``."""
        receive = self._receive_nowait
        if receive is None or self.reader.pending_error is not None:
            return False
        try:
            data = receive(CHUNK)
        except STREAM_ERRORS as exc:
            raise ClientGone(f"client connection failed: {exc}") from exc
        if data is None:
            return False
        if data:
            self._events.extend(self.reader.feed(data))
        else:
            self._eof = True
            self._events.extend(self.reader.feed_eof())
        return True

    async def fill(self) -> None:
        """Read once from the client and parse what came. Raises like ``next_event``."""
        if self.reader.pending_error is not None:
            raise self.reader.pending_error  # never wait for bytes after a framing error
        try:
            data = await self.stream.receive_some(CHUNK)
        except STREAM_ERRORS as exc:
            raise ClientGone(f"client connection failed: {exc}") from exc
        if data:
            self._events.extend(self.reader.feed(data))
        else:
            self._eof = True
            self._events.extend(self.reader.feed_eof())

    async def next_event(self) -> Event | None:
        """The next event, or None when the client closed between requests. Raises
        ``ProtocolError`` (malformed or truncated request, body over the limit) and
        ``ClientGone``."""
        while not self._events:
            if self._eof:
                return None
            await self.fill()
        event = self._events.popleft()
        if isinstance(event, RequestHead):
            self.message_done = False
            self.body_limit = None
            self._body_bytes = 0
        elif event is END:
            self.message_done = True
        elif isinstance(event, Data) and self.body_limit is not None:
            self._body_bytes += len(event.data)
            if self._body_bytes > self.body_limit:
                self._events.appendleft(event)  # the connection is done: keep failing
                raise ProtocolError(f"request body larger than {self.body_limit} bytes", 413)
        return event

    def take_empty_body(self) -> None:
        """Consume the ``END`` of a bodiless request (llhttp emits it with the head)."""
        if not self.message_done and self._events and self._events[0] is END:
            self._events.popleft()
            self.message_done = True


class BodySource(Protocol):
    """Where an exchange reads the request's body events from: the client connection itself
    (``RequestSource``), or one try's replay of a body kept for retries
    (``meshd.proxy.replay``).
    ``message_done`` is true once the request's ``END`` has been taken."""

    @property
    def message_done(self) -> bool: ...

    async def next_event(self) -> Event | RequestTrailers | None: ...


class _KeepsReader(Protocol):
    response_reader: object


def _response_reader(upstream: trio.abc.Stream, request: RequestHead) -> ResponseReader:
    """The reader of the response to ``request``: the one the upstream connection kept from
    its previous exchange, reset, when it can be (``ResponseReader.next_response``), and kept
    for the next (a connection of ``sockio`` or ``streams`` has a ``response_reader``)."""
    kept = getattr(upstream, "response_reader", _MISSING)
    if isinstance(kept, ResponseReader):
        reader = kept.next_response(request.method, request.upgrade)
    else:
        reader = ResponseReader(request.method, request.upgrade)
    if kept is not _MISSING:
        cast(_KeepsReader, upstream).response_reader = reader
    return reader


_MISSING = object()


# How much of a response held back for a retry is read (and thrown away) to keep its
# connection; a longer one closes the connection instead.
HELD_DRAIN_LIMIT = 64 * 1024


class Exchange:
    """Forward one request to an upstream connection and its response back to the client.

    Attributes fill in as it runs, so a caller whose timeout cancelled ``run`` can still see
    how far it got (``response_started`` decides between a 504 and cutting the client off).

    ``hold``, when given, sees each final response head before anything of it goes to the
    client; if it returns True the response is held back (``held_status``): thrown away, the
    client untouched, so that the caller can retry.

    ``requests`` is the client connection's ``RequestSource`` when ``source`` is not (it holds
    the bytes a client sent after an upgrade request); ``on_switch`` is called when a 101 went
    to the client, before the tunnel starts (request timeouts no longer apply).
    ``drop_response`` names headers removed from the response (inbound: meshd's own);
    ``edit_response`` then edits its headers (a route's ``response_headers``)."""

    def __init__(self, request: RequestHead, source: BodySource, client: trio.abc.Stream,
                 upstream: trio.abc.Stream, upstream_head: bytes, *, keep_client: bool,
                 reused_upstream: bool,
                 hold: Callable[[ResponseHead], bool] | None = None,
                 requests: RequestSource | None = None,
                 on_switch: Callable[[], None] | None = None,
                 drop_response: tuple[bytes, ...] = (),
                 edit_response: Callable[[list[Header]], list[Header]] | None = None) -> None:
        self.request = request
        self.source = source
        self.client = client
        self.upstream = upstream
        self.upstream_head = upstream_head
        # the client may keep its connection if all completes (never after an upgrade request:
        # its reader stopped at it)
        self.keep_client = keep_client and not request.upgrade
        self.requests = requests if requests is not None else (
            source if isinstance(source, RequestSource) else None)
        self.on_switch = on_switch
        self.drop_response = drop_response  # header names (lower case) the client never sees
        self.edit_response = edit_response  # the route's response header edits, if any
        self.switched = False  # a 101 went to the client: the connections became a tunnel
        self.reused_upstream = reused_upstream
        self.status = 0  # the status sent to the client, 0 until a response head went out
        self.response_started = False
        self.request_done = False  # the whole request went upstream
        self.response_done = False  # the whole response went to the client
        self.request_bytes = 0  # request body bytes sent upstream (before chunked framing)
        self.response_bytes = 0  # response body bytes relayed to the client (likewise)
        self.upstream_reusable = False
        self.hold = hold
        self.held_status = 0  # the status of a response held back, 0 if none was
        self._drained = False  # a held response was read to its end
        self.client_error: ProxyError | None = None
        self.upstream_error: UpstreamFailed | None = None
        self._reader = _response_reader(upstream, request)
        self._pending: deque[Event] = deque()

    @property
    def client_reusable(self) -> bool:
        return (self.keep_client and self.source.message_done and self.response_done
                and self.client_error is None and self.upstream_error is None)

    async def run(self) -> None:
        """Never raises ``ProxyError``: failures land in ``client_error``/``upstream_error``."""
        if self.request.framing is Framing.NONE and not self.request.upgrade:
            # Nothing to stream upstream but the head: send it, then relay, in this task (a
            # task pair per request costs more than the rest of the exchange).
            if await self._send_request():
                await self._relay_guarded()
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_request_task, nursery.cancel_scope)
                await self._relay_guarded()
                if not self.switched:  # a switched request has no body: its sending ends
                    nursery.cancel_scope.cancel()
            if self.switched:
                await self._tunnel()
        reader = self._reader
        self.upstream_reusable = reusable(self.response_done or self._drained, self.request_done,
                                          reader.keep_alive, reader.extra,
                                          self.upstream_error is not None)

    async def _relay_guarded(self) -> None:
        try:
            await self._relay_response()
        except ClientGone as exc:
            self.client_error = exc
        except UpstreamFailed as exc:
            self.upstream_error = exc

    async def _send_request_task(self, cancel: trio.CancelScope) -> None:
        if not await self._send_request():
            cancel.cancel()

    async def _send_request(self) -> bool:
        """Send the head and the body upstream. False when nothing more can come from the
        client (the exchange must stop)."""
        try:
            await self._write_upstream(self.upstream_head)
            # A bodiless request retried on a fresh connection: its END is already taken.
            while not self.source.message_done:
                event = await self.source.next_event()
                if isinstance(event, Data):
                    self.request_bytes += len(event.data)
                    await self._write_upstream(encode_data(self.request.framing, event.data))
                elif isinstance(event, RequestTrailers):
                    continue  # an HTTP/1.1 request head announced no trailers: none go on
                elif event is not END:
                    raise ProtocolError("connection closed in the middle of a request")
            await self._write_upstream(encode_end(self.request.framing))
            self.request_done = True
        except (ClientGone, ProtocolError) as exc:
            self.client_error = exc
            return False
        except UpstreamFailed as exc:
            # The server stopped reading. Its response (often an early error) may still come,
            # so the response side goes on, and reports the failure if it does not.
            log.debug("sending the request upstream stopped: %s", exc)
        return True

    async def _relay_response(self) -> None:
        """Relay the response. What the reader already parsed goes out in one write (a short
        response's head, body and end are usually one read: one write, one TLS record), and
        the buffer is flushed before waiting for more, so nothing sits in it while we wait."""
        framing = Framing.NONE
        out: list[bytes] = []
        size = 0
        while True:
            if out and (not self._pending or size >= CHUNK):
                await self._write_client(b"".join(out))
                out.clear()
                size = 0
            event = await self._next_upstream_event()
            if isinstance(event, ResponseHead):
                if event.status == 101:
                    await self._write_client(self._switch_head(event))
                    self.status, self.response_started, self.switched = 101, True, True
                    if self.on_switch is not None:
                        self.on_switch()
                    return
                if event.informational:
                    if self.request.version == "1.1":
                        await self._write_client(serialize_response(
                            event.status, event.reason, end_to_end(event.headers),
                            Framing.NONE))
                    continue
                if self.hold is not None and self.hold(event):
                    self.held_status = event.status
                    await self._drain_held(event)
                    return
                framing = downstream_framing(event, self.request)
                if framing is Framing.CLOSE:
                    self.keep_client = False
                chunk = self._client_head(event, framing)
                self.status = event.status
                self.response_started = True
            elif isinstance(event, Data):
                self.response_bytes += len(event.data)
                chunk = encode_data(framing, event.data)
            else:
                out.append(encode_end(framing))
                await self._write_client(b"".join(out))
                self.response_done = True
                return
            out.append(chunk)
            size += len(chunk)

    async def _drain_held(self, head: ResponseHead) -> None:
        """Read a held response to its end when it is short, so its connection can be reused."""
        if head.framing is Framing.LENGTH and (head.content_length or 0) <= HELD_DRAIN_LIMIT:
            while await self._next_upstream_event() is not END:
                pass
            self._drained = True
        elif head.framing is Framing.NONE:
            self._drained = self._reader.done

    @staticmethod
    def _switch_head(head: ResponseHead) -> bytes:
        upgrade = b", ".join(v for n, v in head.headers if n.lower() == b"upgrade")
        headers = [*end_to_end(head.headers, keep_length=True), (b"connection", b"upgrade")]
        if upgrade:
            headers.append((b"upgrade", upgrade))
        return serialize_response(101, head.reason, headers, Framing.NONE)

    async def _tunnel(self) -> None:
        """After a 101: the bytes each reader already held, then everything, both ways."""
        self.keep_client = False
        client, upstream = self.client, self.upstream
        to_client = bytes(self._reader.tail)
        to_upstream = bytes(self.requests.reader.tail) if self.requests is not None else b""
        try:
            await self._write_client(to_client)
            await self._write_upstream(to_upstream)
        except (ClientGone, UpstreamFailed) as exc:
            log.debug("upgraded connection ended at once: %s", exc)
            return
        if not (isinstance(client, trio.abc.HalfCloseableStream)
                and isinstance(upstream, trio.abc.HalfCloseableStream)):
            raise AssertionError("a tunnel needs half-closeable streams")
        await pump(client, upstream)
        self.response_done = True

    def _client_head(self, head: ResponseHead, framing: Framing) -> bytes:
        connection: bytes | None = None
        if not self.keep_client:
            connection = b"close"
        elif self.request.version != "1.1":
            connection = b"keep-alive"
        # A response without a body (HEAD, 204, 304) keeps the length the upstream announced.
        headers = end_to_end(head.headers, keep_length=framing is Framing.NONE,
                             drop=self.drop_response)
        if self.edit_response is not None:
            headers = self.edit_response(headers)
        return serialize_response(head.status, head.reason, headers, framing,
                                  head.content_length, connection)

    async def _next_upstream_event(self) -> Event:
        reader = self._reader
        while not self._pending:
            try:
                data = await self.upstream.receive_some(CHUNK)
            except STREAM_ERRORS as exc:
                raise UpstreamFailed(f"upstream connection failed: {exc}",
                                     stale=self._stale(),
                                     pooled_dead=self._pooled_dead()) from exc
            try:
                self._pending.extend(reader.feed(data) if data else reader.feed_eof())
            except NoResponse as exc:
                raise UpstreamFailed(str(exc), stale=self._stale(),
                                     pooled_dead=self._pooled_dead()) from exc
            except ProtocolError as exc:
                raise UpstreamFailed(f"malformed response from upstream: {exc}",
                                     malformed=True) from exc
        return self._pending.popleft()

    def _pooled_dead(self) -> bool:
        return pooled_dead(self.reused_upstream, self._reader.received)

    def _stale(self) -> bool:
        return stale(self.reused_upstream, self._reader.done, self.response_started,
                     self.request.framing is Framing.NONE)

    async def _write_upstream(self, data: bytes) -> None:
        if not data:
            return
        try:
            await self.upstream.send_all(data)
        except STREAM_ERRORS as exc:
            raise UpstreamFailed(f"upstream connection failed: {exc}",
                                 stale=self._stale(), pooled_dead=self._pooled_dead()) from exc

    async def _write_client(self, data: bytes) -> None:
        if not data:
            return
        try:
            await self.client.send_all(data)
        except STREAM_ERRORS as exc:
            raise ClientGone(f"client connection failed: {exc}") from exc
