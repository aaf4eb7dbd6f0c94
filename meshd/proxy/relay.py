"""One request/response exchange where either side speaks HTTP/2: the counterpart of
``meshd.proxy.exchange.Exchange`` (HTTP/1.1 on both sides, which stays the lean path).

The exchange works on messages, not bytes: a head, body chunks, trailers, the end. Each side
has an adapter: downstream an ``H2Request`` (``h2conn``) or an ``H1Sink`` (an HTTP/1.1 client,
inbound when the app speaks h2c); upstream an ``H2Upstream`` (a stream on a pooled HTTP/2
connection) or an ``H1Upstream`` (an HTTP/1.1 app behind an HTTP/2 caller). The request body
streams up while the response streams back; each side reads again only once its last write
went out, so flow control (HTTP/2's credit, TCP's window) carries backpressure end to end.

What the forwarding loop (``meshd.proxy.attempts``) reads of an exchange is the same as for
``Exchange``: ``status``, ``response_started``, ``held_status``, ``client_error``,
``upstream_error``, ``client_reusable``; ``grpc_status`` is the call's outcome when there is one.
A Trailers-Only response (a head that ends the stream: how gRPC servers, and meshd, report an
error before any message) stays one.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from meshd.errors import ProxyError
from meshd.proxy.core import h2 as core
from meshd.proxy.core.attempt import pooled_dead, reusable, stale
from meshd.proxy.core.grpc import grpc_status_of
from meshd.proxy.core.h2 import RequestTrailers
from meshd.proxy.core.http1 import (
    END,
    Data,
    Framing,
    Header,
    NoResponse,
    ProtocolError,
    RequestHead,
    ResponseHead,
    ResponseReader,
    downstream_framing,
)
from meshd.proxy.core.http1 import Event as H1Event
from meshd.proxy.core.http1_write import encode_data, encode_end, end_to_end, serialize_response
from meshd.proxy.exchange import STREAM_ERRORS, ClientGone, UpstreamFailed
from meshd.proxy.h2conn import H2Upstream

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


class BodySource(Protocol):
    @property
    def message_done(self) -> bool: ...

    async def next_event(self) -> H1Event | RequestTrailers | None: ...


class Sink(Protocol):
    """Where a response goes."""

    async def send_head(self, status: int, headers: Sequence[Header], *, end: bool = False,
                        length: int | None = None) -> None: ...

    async def send_data(self, data: bytes) -> None: ...

    async def send_trailers(self, headers: Sequence[Header]) -> None: ...

    async def end(self) -> None: ...


class H1Sink:
    """An HTTP/1.1 client's connection as a ``Sink`` (trailers are not passed on: HTTP/1.1
    clients seldom ask for them)."""

    def __init__(self, stream: trio.abc.Stream, request: RequestHead, keep_client: bool) -> None:
        self.stream = stream
        self.request = request
        self.keep_client = keep_client
        self._framing = Framing.NONE

    async def _write(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except STREAM_ERRORS as exc:
            raise ClientGone(f"client connection failed: {exc}") from exc

    async def send_head(self, status: int, headers: Sequence[Header], *, end: bool = False,
                        length: int | None = None) -> None:
        if end:
            framing = Framing.LENGTH if self.request.method != b"HEAD" else Framing.NONE
            length = 0 if framing is Framing.LENGTH else length
        elif length is not None:
            framing = Framing.LENGTH
        else:
            framing = Framing.CHUNKED if self.request.version == "1.1" else Framing.CLOSE
        head = ResponseHead(status, b"", "2", tuple(headers), True, framing, length)
        framing = downstream_framing(head, self.request)
        if framing is Framing.CLOSE:
            self.keep_client = False
        self._framing = framing
        connection = b"close" if not self.keep_client else (
            b"keep-alive" if self.request.version != "1.1" else None)
        await self._write(serialize_response(status, b"", end_to_end(headers), framing,
                                             length, connection))

    async def send_data(self, data: bytes) -> None:
        await self._write(encode_data(self._framing, data))

    async def send_trailers(self, headers: Sequence[Header]) -> None:
        await self.end()

    async def end(self) -> None:
        await self._write(encode_end(self._framing))


class H1Upstream:
    """An HTTP/1.1 connection to an app, carrying one request from an HTTP/2 caller."""

    def __init__(self, stream: trio.abc.Stream, head: bytes, request: RequestHead,
                 reused: bool) -> None:
        self.stream = stream
        self.head = head
        self.request = request
        self.reused = reused
        self.reader = ResponseReader(request.method)
        self._pending: deque[H1Event] = deque()

    def _failed(self, message: str, *, malformed: bool = False) -> UpstreamFailed:
        return UpstreamFailed(message,
                              stale=stale(self.reused, self.reader.done, False,
                                          self.request.framing is Framing.NONE),
                              pooled_dead=pooled_dead(self.reused, self.reader.received),
                              malformed=malformed)

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        try:
            await self.stream.send_all(data)
        except STREAM_ERRORS as exc:
            raise self._failed(f"upstream connection failed: {exc}") from exc

    async def start(self) -> None:
        await self._write(self.head)

    async def send_data(self, data: bytes) -> None:
        await self._write(encode_data(self.request.framing, data))

    async def end(self, trailers: Sequence[Header] | None = None) -> None:
        await self._write(encode_end(self.request.framing))

    async def next_event(self) -> H1Event:
        while not self._pending:
            try:
                data = await self.stream.receive_some(CHUNK)
            except STREAM_ERRORS as exc:
                raise self._failed(f"upstream connection failed: {exc}") from exc
            try:
                self._pending.extend(self.reader.feed(data) if data else self.reader.feed_eof())
            except NoResponse as exc:
                raise self._failed(str(exc)) from exc
            except ProtocolError as exc:
                raise self._failed(f"malformed response from upstream: {exc}",
                                   malformed=True) from exc
        return self._pending.popleft()


Upstream = H1Upstream | H2Upstream


class MessageExchange:
    """Forward one request to ``upstream`` and its response to ``sink`` (the module doc).
    ``hold``, ``drop_response`` and ``edit_response`` as for ``Exchange``."""

    def __init__(self, request: RequestHead, source: BodySource, sink: Sink,
                 upstream: Upstream, *, keep_client: bool = True,
                 hold: Callable[[ResponseHead], bool] | None = None,
                 drop_response: tuple[bytes, ...] = (),
                 edit_response: Callable[[list[Header]], list[Header]] | None = None) -> None:
        self.request = request
        self.source = source
        self.sink = sink
        self.upstream = upstream
        self.keep_client = keep_client
        self.hold = hold
        self.drop_response = drop_response
        self.edit_response = edit_response  # the route's response header edits, if any
        self.switched = False
        self.status = 0
        self.grpc_status: int | None = None
        self.response_started = False
        self.request_done = False
        self.response_done = False
        self.upstream_reusable = False
        self.held_status = 0
        self.client_error: ProxyError | None = None
        self.upstream_error: UpstreamFailed | None = None
        self.request_bytes = 0
        self.response_bytes = 0
        self._head_ended = False

    @property
    def client_reusable(self) -> bool:
        return (self.keep_client and self.source.message_done and self.response_done
                and self.client_error is None and self.upstream_error is None)

    async def run(self) -> None:
        """Never raises ``ProxyError``: failures land in ``client_error``/``upstream_error``."""
        try:
            await self.upstream.start()
        except UpstreamFailed as exc:
            self.upstream_error = exc
            return
        if self.request.framing is Framing.NONE:  # its END is all that is left to read
            if await self._send_request():
                await self._relay_guarded()
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_request_task, nursery.cancel_scope)
                await self._relay_guarded()
                nursery.cancel_scope.cancel()
        if isinstance(self.upstream, H1Upstream):
            reader = self.upstream.reader
            self.upstream_reusable = reusable(self.response_done, self.request_done,
                                              reader.keep_alive, reader.extra,
                                              self.upstream_error is not None)

    async def _send_request_task(self, cancel: trio.CancelScope) -> None:
        if not await self._send_request():
            cancel.cancel()

    async def _send_request(self) -> bool:
        trailers: list[Header] | None = None
        try:
            while not self.source.message_done:
                event = await self.source.next_event()
                if isinstance(event, Data):
                    self.request_bytes += len(event.data)
                    await self.upstream.send_data(event.data)
                elif isinstance(event, RequestTrailers):
                    trailers = event.headers
                elif event is not END:
                    raise ProtocolError("connection closed in the middle of a request")
            if isinstance(self.upstream, H1Upstream) or self.request.framing is not Framing.NONE:
                await self.upstream.end(trailers)
            self.request_done = True
        except (ClientGone, ProtocolError) as exc:
            self.client_error = exc
            return False
        except UpstreamFailed as exc:
            log.debug("sending the request upstream stopped: %s", exc)
        return True

    async def _relay_guarded(self) -> None:
        try:
            await self._relay()
        except ClientGone as exc:
            self.client_error = exc
        except UpstreamFailed as exc:
            self.upstream_error = exc

    async def _relay(self) -> None:
        sink = self.sink
        while True:
            event = await self.upstream.next_event()
            if isinstance(event, (ResponseHead, core.Opened)):
                head = self._head(event)
                if head.informational or head.status == 101:
                    continue
                ended = head.framing is Framing.NONE and self._head_ended
                if ended:  # Trailers-Only: the call's status is in the head
                    self.grpc_status = grpc_status_of(head.headers)
                if self.hold is not None and self.hold(head):
                    self.held_status = head.status
                    return
                self.status = head.status
                self.response_started = True
                headers = self._headers(head.headers)
                if self.edit_response is not None:
                    headers = self.edit_response(headers)
                await sink.send_head(head.status, headers, end=ended,
                                     length=head.content_length)
                if ended:  # its END is not waited for
                    self.response_done = True
                    return
            elif isinstance(event, (Data, core.Body)):
                data = event.data
                self.response_bytes += len(data)
                await sink.send_data(data)
            elif isinstance(event, core.Trailers):
                fields = core.trailer_fields(event.headers)
                self.grpc_status = grpc_status_of(fields)
                await sink.send_trailers(self._headers(fields))
                self.response_done = True
                return
            else:  # END, Ended
                await sink.end()
                self.response_done = True
                return

    def _head(self, event: ResponseHead | core.Opened) -> ResponseHead:
        if isinstance(event, ResponseHead):
            self._head_ended = event.framing is Framing.NONE
            return event
        self._head_ended = event.ended
        return core.response_head(event.headers, event.ended, self.request.method)

    def _headers(self, headers: Sequence[Header]) -> list[Header]:
        if not self.drop_response:
            return list(headers)
        drop = self.drop_response
        return [(n, v) for n, v in headers if n.lower() not in drop]
