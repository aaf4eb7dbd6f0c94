"""HTTP/2 connections: the trio shell around ``core.h2.Session``, both sides.

    serve_h2 (a client's connection: an app's h2c, or a peer meshd's h2 over mTLS)
      ├─ the reader: socket → session → each stream's inbox; GOAWAY on errors and floods
      └─ one task per request stream: the handler (the same one HTTP/1.1 requests go to),
         reading its body from an ``H2Request`` and answering on it

    H2Pool (connections meshd opens: to peer meshds over mTLS with ALPN h2, to h2c apps)
      └─ one reader task per connection, in the pool's nursery; requests take a stream on
         a connection with room (the peer's SETTINGS_MAX_CONCURRENT_STREAMS) or a new one

Flow control is backpressure: body bytes are given back to the peer as credit only once the
proxy has passed them on, and a sender waits for the peer's credit (``STALL_TIMEOUT`` at most,
then the stream is reset). One writer task per connection drains the session's output to the
socket once the tasks ready at the time have queued their frames, so a batch of frames is one
write; a sender waits while that writer is blocked on the socket.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field

import trio

from meshd.proxy.core import h2 as core
from meshd.proxy.core.grpc import grpc_request, status_for_meshd_error, trailers_only
from meshd.proxy.core.h2 import RequestTrailers
from meshd.proxy.core.http1 import END, Data, Header, ProtocolError, RequestHead
from meshd.proxy.core.http1 import Event as H1Event
from meshd.proxy.exchange import STREAM_ERRORS, ClientGone, UpstreamFailed

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
# a sender waiting this long for the peer's flow-control credit gives up on the stream
STALL_TIMEOUT = 30.0
# from a connection's start to its first request (as an HTTP/1.1 head's deadline)
FIRST_REQUEST_TIMEOUT = 10.0


class StreamGone(ClientGone):
    """The stream was reset, or its connection closed."""


@dataclass(eq=False)
class _Stream:
    # events waiting for the stream's task; body bytes bounded by the stream window (the peer
    # cannot send more before credit comes back)
    inbox: deque[core.StreamEvent] = field(default_factory=deque)
    waiter: trio.Event | None = None
    window: trio.Event | None = None
    reset_code: int | None = None
    scope: trio.CancelScope | None = None  # the handler's (server side): cut on reset

    def wake(self) -> None:
        if self.waiter is not None:
            self.waiter.set()
            self.waiter = None

    def wake_window(self) -> None:
        if self.window is not None:
            self.window.set()
            self.window = None


class _Connection:
    """What both sides share: the session, the streams, writing, waiting for credit."""

    def __init__(self, transport: trio.abc.Stream, session: core.Session) -> None:
        self.transport = transport
        self.session = session
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.close_reason = ""
        self._writing = False  # a write in progress
        self._wanted = False  # frames queued while the writer was busy
        self._wake: trio.Event | None = None  # the writer, waiting for frames
        self._written: trio.Event | None = None  # tasks waiting for a write to end

    def kick(self) -> None:
        """Have the writer take what the session queued once the tasks ready now have run:
        the frames of several streams, and a message's head, body and end, go out in one
        write (one system call, one TLS record) instead of one each."""
        self._wanted = True
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    async def flush(self) -> None:
        """Queue what the session has for the writer; while the writer is blocked on the
        socket (the peer reads slowly), wait for it: backpressure. A task already cancelled
        raises here, its frames still go out (a reset, say)."""
        self.kick()
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._writing and not self.closed:
            await self._wait_written()

    async def _wait_written(self) -> None:
        if self._written is None:
            self._written = trio.Event()
        await self._written.wait()

    async def write_loop(self) -> None:
        """The connection's writer, until it closes."""
        while not self.closed:
            if not self._wanted:
                self._wake = trio.Event()
                await self._wake.wait()
                continue  # closed meanwhile, or frames to write
            self._wanted = False
            await self._write_out()

    async def write_all(self) -> None:
        """Write what is queued now, here (a connection's first and last frames: the preface,
        a GOAWAY), after a write the writer has in progress."""
        while self._writing:
            await self._wait_written()
        await self._write_out()

    async def _write_out(self) -> None:
        """Bytes taken from the session are written whole even when the task is cancelled
        meanwhile: they may hold other streams' frames, and half a frame would break the
        connection for all of them. So the write is shielded, bounded by ``STALL_TIMEOUT``
        (then the connection is given up)."""
        self._writing = True
        try:
            while True:
                data = self.session.outgoing()
                if not data:
                    return
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(STALL_TIMEOUT) as stalled:
                        await self.transport.send_all(data)
                if stalled.cancelled_caught:
                    self._lost(f"the peer read nothing for {STALL_TIMEOUT:g}s")
                    await trio.aclose_forcefully(self.transport)
                    return
        except STREAM_ERRORS as exc:
            self._lost(f"connection failed: {exc}")
        finally:
            self._writing = False
            if self._written is not None:
                self._written.set()
                self._written = None

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.kick()  # the writer ends
        for state in self.streams.values():
            state.wake()
            state.wake_window()

    def dispatch(self, event: core.Event) -> None:
        if isinstance(event, core.Window):
            if event.stream_id == 0:
                for each in self.streams.values():
                    each.wake_window()
            elif event.stream_id in self.streams:
                self.streams[event.stream_id].wake_window()
            return
        if isinstance(event, (core.GoingAway, core.Failed)):
            return
        state = self.streams.get(event.stream_id)
        if state is None:
            if isinstance(event, core.Body):  # a stream we gave up on: its credit comes back
                self.session.consumed(event.stream_id, event.flow)
            return
        if isinstance(event, core.Reset):
            state.reset_code = event.code
            if state.scope is not None:
                state.scope.cancel()
        state.inbox.append(event)
        state.wake()
        if isinstance(event, core.Reset):
            state.wake_window()

    async def next_event(self, stream_id: int, state: _Stream) -> core.StreamEvent | None:
        """The stream's next event; None once the connection is gone."""
        while not state.inbox:
            if self.closed:
                return None
            state.waiter = trio.Event()
            await state.waiter.wait()
        event = state.inbox.popleft()
        if isinstance(event, core.Body) and event.flow:
            self.session.consumed(stream_id, event.flow)
            self.kick()  # a window update, when half a window was used
        return event

    async def send_data(self, stream_id: int, state: _Stream, data: bytes) -> None:
        """Send ``data`` as the peer's credit allows; raises ``StreamGone``."""
        view = memoryview(data)
        while view:
            if self.closed or state.reset_code is not None:
                raise StreamGone(self._gone_reason(state))
            window = self.session.send_window(stream_id)
            if window <= 0:
                state.window = trio.Event()
                with trio.move_on_after(STALL_TIMEOUT) as stalled:
                    await state.window.wait()
                if stalled.cancelled_caught:
                    self.session.reset(stream_id, core.CANCEL)
                    await self.flush()
                    raise StreamGone(f"the peer gave no flow-control credit for "
                                     f"{STALL_TIMEOUT:g}s")
                continue
            chunk = view[:window]
            try:
                self.session.send_data(stream_id, bytes(chunk))
            except core.SendRefused as exc:
                raise StreamGone(f"stream closed: {exc}") from exc
            view = view[len(chunk):]
            await self.flush()

    def _gone_reason(self, state: _Stream) -> str:
        if state.reset_code is not None:
            return f"stream reset (error code {state.reset_code})"
        return self.close_reason or "connection closed"

    async def read(self, on_event: Callable[[core.Event], None]) -> None:
        """Read until the connection ends or fails; every event to ``on_event``."""
        try:
            while not self.closed:
                try:
                    data = await self.transport.receive_some(CHUNK)
                except STREAM_ERRORS as exc:
                    self._lost(f"connection failed: {exc}")
                    return
                if not data:
                    self._lost("connection closed by the peer")
                    return
                for event in self.session.feed(data, trio.current_time()):
                    on_event(event)
                failed = self.session.failed
                if failed is not None:
                    await self.write_all()  # the GOAWAY, before the connection closes
                    self._lost(f"HTTP/2 error: {failed.reason}")
                    return
                self.kick()
        finally:
            if not self.closed:
                self._lost("connection closed")


async def starts_h2(stream: trio.abc.Stream) -> bool:
    """Whether a plaintext client opens with the HTTP/2 connection preface (h2c with prior
    knowledge), peeked at and left in place: an HTTP/1.1 request differs within its first
    bytes. A client that sends a prefix of the preface and stalls is waited for
    ``FIRST_REQUEST_TIMEOUT``, then taken for HTTP/1.1 (which answers its garbage with a 400)."""
    peek = getattr(stream, "peek", None)
    if peek is None:
        return False
    with trio.move_on_after(FIRST_REQUEST_TIMEOUT):
        while True:
            try:
                seen = await peek(len(core.PREFACE))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            if not seen or not core.PREFACE.startswith(seen):
                return False
            if len(seen) == len(core.PREFACE):
                return True
            await trio.sleep(0.01)  # a preface split over packets: look again shortly
    return False


# -- server side -------------------------------------------------------------------------------


class H2Request:
    """One request stream as the proxy's handlers see it: the body source of a request
    (``RequestSource``'s interface) and where its response goes."""

    def __init__(self, conn: _Connection, stream_id: int, state: _Stream, head: RequestHead,
                 ended: bool) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.state = state
        self.head = head
        self.message_done = False  # until its END is taken (a bodiless request's comes next)
        self.body_limit: int | None = None
        self.grpc = grpc_request(head.headers)
        self.finished = False
        self._body_bytes = 0

    # the request side (``exchange.BodySource``)

    @property
    def has_input(self) -> bool:
        return bool(self.state.inbox)

    def take_empty_body(self) -> None:
        """Nothing to do: an HTTP/2 request that has no body says so with its head."""

    async def next_event(self) -> H1Event | RequestTrailers | None:
        if self.message_done:
            return None
        event = await self.conn.next_event(self.stream_id, self.state)
        if event is None or isinstance(event, core.Reset):
            raise StreamGone(self.conn._gone_reason(self.state))
        if isinstance(event, core.Body):
            self._body_bytes += len(event.data)
            if self.body_limit is not None and self._body_bytes > self.body_limit:
                raise ProtocolError(f"request body larger than {self.body_limit} bytes", 413)
            return Data(event.data)
        if isinstance(event, core.Trailers):
            return RequestTrailers(core.trailer_fields(event.headers))
        if isinstance(event, core.Ended):
            self.message_done = True
            return END
        raise AssertionError(f"unexpected request event {event!r}")

    # the response side

    async def send_head(self, status: int, headers: Sequence[Header], *, end: bool = False,
                        length: int | None = None) -> None:
        self._check()
        self._send(lambda: self.conn.session.send_headers(
            self.stream_id, core.response_fields(status, headers, length=length), end=end))
        self.finished = end
        await self.conn.flush()

    async def send_data(self, data: bytes) -> None:
        if data:
            await self.conn.send_data(self.stream_id, self.state, data)

    async def send_trailers(self, headers: Sequence[Header]) -> None:
        self._check()
        self._send(lambda: self.conn.session.send_headers(
            self.stream_id, core.trailer_fields(headers), end=True))
        self.finished = True
        await self.conn.flush()

    async def end(self) -> None:
        self._check()
        self._send(lambda: self.conn.session.end_stream(self.stream_id))
        self.finished = True
        await self.conn.flush()

    async def answer(self, status: int, text: str, headers: Sequence[Header] = (),
                     *, code: str = "") -> bool:
        """meshd's own answer: a gRPC call gets a Trailers-Only response with the gRPC
        status for ``status`` (``code``: the ``x-meshd-error`` code), anything else a short
        text body. Always True: the connection carries on."""
        try:
            if self.grpc:
                grpc_status = status_for_meshd_error(status, code)
                fields = trailers_only(int(grpc_status), text, headers)
                self._check()
                self._send(lambda: self.conn.session.send_headers(self.stream_id, fields,
                                                                  end=True))
                self.finished = True
                await self.conn.flush()
            else:
                body = (text.rstrip("\n") + "\n").encode("utf-8", "replace")
                await self.send_head(status, [(b"content-type", b"text/plain; charset=utf-8"),
                                              *headers], length=len(body))
                await self.send_data(body)
                await self.end()
        except StreamGone:
            pass  # the client is gone or reset the stream: nobody to answer
        return True

    def _send(self, send: Callable[[], None]) -> None:
        try:
            send()
        except core.SendRefused as exc:
            raise StreamGone(f"stream closed: {exc}") from exc

    def _check(self) -> None:
        if self.conn.closed or self.state.reset_code is not None:
            raise StreamGone(self.conn._gone_reason(self.state))


RequestHandler = Callable[[RequestHead, H2Request], Awaitable[object]]


async def serve_h2(transport: trio.abc.Stream, handle: RequestHandler, idle_timeout: float,
                   *, limits: core.Limits = core.DEFAULT_LIMITS,
                   on_bad_request: Callable[[ProtocolError], None] | None = None,
                   draining: Callable[[], bool] = lambda: False,
                   set_drain_hook: Callable[[Callable[[], None] | None], None] | None = None,
                   peer: str = "") -> None:
    """Serve one HTTP/2 connection until the client goes, it idles ``idle_timeout`` with no
    stream open, it breaks the protocol (GOAWAY), or a drain (``set_drain_hook`` registers
    what a drain calls: GOAWAY, then the streams in flight finish)."""
    session = core.Session(client_side=False, limits=limits)
    conn = _Connection(transport, session)
    session.start()
    await conn.write_all()
    active = 0
    idle = trio.CancelScope(deadline=trio.current_time() + FIRST_REQUEST_TIMEOUT)
    stopping = False

    def went_idle() -> None:
        if stopping or session.going_away:
            idle.cancel()
        else:
            idle.deadline = trio.current_time() + idle_timeout

    async def run_stream(stream_id: int, state: _Stream, head: RequestHead,
                         ended: bool) -> None:
        nonlocal active
        request = H2Request(conn, stream_id, state, head, ended)
        try:
            with trio.CancelScope() as scope:
                state.scope = scope
                if state.reset_code is not None:
                    return  # reset before its handler ran (rapid reset): no work for it
                await handle(head, request)
                if not request.finished and not conn.closed:
                    session.reset(stream_id, core.INTERNAL_ERROR)
                elif not request.message_done and not conn.closed:
                    # answered before the whole body came: stop the client sending it
                    session.reset(stream_id, core.NO_ERROR)
        except Exception:
            log.exception("HTTP/2 stream %d from %s failed", stream_id, peer)
            session.reset(stream_id, core.INTERNAL_ERROR)
        finally:
            conn.streams.pop(stream_id, None)
            active -= 1
            if active == 0:
                went_idle()
            if not conn.closed:
                await conn.flush()

    def drain() -> None:
        nonlocal stopping
        stopping = True
        session.goaway()
        conn.kick()
        if active == 0:
            idle.cancel()

    def on_event(event: core.Event) -> None:
        nonlocal active
        if isinstance(event, core.Opened) and event.stream_id not in conn.streams:
            if stopping or session.going_away:
                session.reset(event.stream_id, core.REFUSED_STREAM)
                return
            try:
                head = core.request_head(event.headers, event.ended)
            except ValueError as exc:
                bad = ProtocolError(str(exc), 405 if "CONNECT" in str(exc) else 400)
                if on_bad_request is not None:
                    on_bad_request(bad)
                session.reset(event.stream_id, core.PROTOCOL_ERROR)
                return
            state = _Stream()
            conn.streams[event.stream_id] = state
            active += 1
            idle.deadline = math.inf
            nursery.start_soon(run_stream, event.stream_id, state, head, event.ended)
            return
        if isinstance(event, core.Failed):
            log.info("HTTP/2 connection from %s: %s (GOAWAY sent)", peer, event.reason)
            if on_bad_request is not None:
                on_bad_request(ProtocolError(f"HTTP/2: {event.reason}", 400))
            return
        conn.dispatch(event)

    try:
        async with trio.open_nursery() as nursery:
            if set_drain_hook is not None:
                set_drain_hook(drain)
            if draining():
                drain()

            async def reader() -> None:
                with idle:
                    await conn.read(on_event)
                if idle.cancelled_caught:
                    # idle with no stream open, or drained: the read's end marked the
                    # connection closed; the client is told so (GOAWAY) before it closes
                    session.goaway()
                    with trio.move_on_after(STALL_TIMEOUT):
                        await conn.write_all()
                else:
                    # a connection error (GOAWAY sent: the connection must close now) or the
                    # client gone: nobody to answer the streams in flight, stop their work
                    nursery.cancel_scope.cancel()

            nursery.start_soon(reader)
            nursery.start_soon(conn.write_loop)
    finally:
        if set_drain_hook is not None:
            set_drain_hook(None)


# -- client side -------------------------------------------------------------------------------


class H2Client:
    """A connection meshd opened, carrying requests as streams. Its reader runs in the pool's
    nursery (``run``)."""

    def __init__(self, transport: trio.abc.Stream, key: Hashable,
                 limits: core.Limits = core.POOL_LIMITS) -> None:
        self.key = key
        self.conn = _Connection(transport, core.Session(client_side=True, limits=limits))
        self.limits = limits
        self.idle_since = trio.current_time()
        self.reserved = 0  # streams promised to requests about to open them

    @property
    def usable(self) -> bool:
        session = self.conn.session
        return (not self.conn.closed and not session.going_away
                and session.peer_going_away is None)

    @property
    def room(self) -> int:
        session = self.conn.session
        cap = min(session.peer_max_streams, self.limits.max_concurrent_streams)
        return cap - len(self.conn.streams) - self.reserved

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        conn = self.conn
        conn.session.start()
        await conn.write_all()
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.write_loop)
                await conn.read(self._on_event)
        finally:
            await trio.aclose_forcefully(conn.transport)

    def _on_event(self, event: core.Event) -> None:
        if isinstance(event, core.GoingAway):
            # streams the server never took are failed as never processed
            for stream_id, state in list(self.conn.streams.items()):
                if stream_id > event.last_stream_id:
                    state.reset_code = core.REFUSED_STREAM
                    state.inbox.append(core.Reset(stream_id, core.REFUSED_STREAM, True))
                    state.wake()
                    state.wake_window()
            return
        self.conn.dispatch(event)

    def open(self, fields: Sequence[Header], *, end: bool, reused: bool) -> H2Upstream:
        """Start a request (its head sent on the next flush)."""
        session = self.conn.session
        stream_id = session.next_stream_id()
        state = _Stream()
        self.conn.streams[stream_id] = state
        upstream = H2Upstream(self, stream_id, state, reused)
        try:
            session.send_headers(stream_id, fields, end=end)
        except core.SendRefused as exc:
            self.conn.streams.pop(stream_id, None)
            raise upstream._failed(f"upstream connection refused a stream: {exc}") from exc
        return upstream

    async def close(self) -> None:
        if not self.conn.closed:
            self.conn.session.goaway()
            await self.conn.write_all()
            self.conn._lost("closed by meshd")
        await trio.aclose_forcefully(self.conn.transport)


class H2Upstream:
    """A request on an ``H2Client``: the upstream side of an exchange."""

    def __init__(self, client: H2Client, stream_id: int, state: _Stream, reused: bool) -> None:
        self.client = client
        self.stream_id = stream_id
        self.state = state
        self.reused = reused
        self.received = False  # a byte of an answer came
        self.request_method = b"GET"

    def _failed(self, message: str) -> UpstreamFailed:
        state = self.state
        # refused or never taken (GOAWAY): nothing reached the app, safe on a new connection
        unprocessed = state.reset_code == core.REFUSED_STREAM or (
            not self.received and self.client.conn.closed and self.reused)
        return UpstreamFailed(message, stale=unprocessed, pooled_dead=unprocessed)

    async def start(self) -> None:
        await self.client.conn.flush()
        if self.client.conn.closed:
            raise self._failed(f"upstream connection failed: {self.client.conn.close_reason}")

    async def send_data(self, data: bytes) -> None:
        try:
            await self.client.conn.send_data(self.stream_id, self.state, data)
        except StreamGone as exc:
            raise self._failed(f"upstream stream failed: {exc}") from exc

    async def end(self, trailers: Sequence[Header] | None = None) -> None:
        conn = self.client.conn
        if conn.closed or self.state.reset_code is not None:
            raise self._failed(f"upstream stream failed: {conn._gone_reason(self.state)}")
        try:
            if trailers:
                conn.session.send_headers(self.stream_id, core.trailer_fields(trailers),
                                          end=True)
            else:
                conn.session.end_stream(self.stream_id)
        except core.SendRefused as exc:
            raise self._failed(f"upstream stream failed: {exc}") from exc
        await conn.flush()

    async def next_event(self) -> core.StreamEvent:
        event = await self.client.conn.next_event(self.stream_id, self.state)
        if event is None:
            raise self._failed(f"upstream connection failed: {self.client.conn.close_reason}")
        if isinstance(event, core.Reset):
            raise self._failed(f"upstream reset the stream (error code {event.code})")
        self.received = True
        return event

    async def release(self) -> None:
        """The exchange is over: the slot freed, a stream still open reset. (The slot first:
        this runs in ``finally`` blocks of cancelled tasks: the writer sends the reset.)"""
        client = self.client
        client.conn.streams.pop(self.stream_id, None)
        client.idle_since = trio.current_time()
        if client.conn.session.stream_open(self.stream_id):
            client.conn.session.reset(self.stream_id, core.CANCEL)
            client.conn.kick()


Connector = Callable[[], Awaitable[trio.abc.HalfCloseableStream]]


class H2Pool:
    """Multiplexed connections per key. ``acquire`` opens a stream on a connection with
    room, or on a new one (concurrent requests wait for a connection being opened rather
    than each opening their own). Idle connections close after ``idle_timeout``."""

    def __init__(self, idle_timeout: float, limits: core.Limits = core.POOL_LIMITS) -> None:
        self.idle_timeout = idle_timeout
        self.limits = limits
        self._clients: dict[Hashable, list[H2Client]] = {}
        self._opening: dict[Hashable, trio.Event] = {}
        self._nursery: trio.Nursery | None = None

    def connections(self) -> int:
        return sum(len(v) for v in self._clients.values())

    async def open_stream(self, key: Hashable, connect: Connector, fields: Sequence[Header],
                          *, end: bool) -> H2Upstream:
        """A new stream on a connection to ``key`` carrying a request with head ``fields``.
        Raises ``ConnectFailed`` (from ``connect``) or ``UpstreamFailed``."""
        client, reused = await self._client(key, connect)
        client.reserved -= 1
        upstream = client.open(fields, end=end, reused=reused)
        await upstream.start()
        return upstream

    async def _client(self, key: Hashable, connect: Connector) -> tuple[H2Client, bool]:
        while True:
            for client in self._clients.get(key, ()):
                if client.usable and client.room > 0:
                    client.reserved += 1
                    return client, True
            opening = self._opening.get(key)
            if opening is not None:
                await opening.wait()
                continue
            break
        event = self._opening[key] = trio.Event()
        try:
            transport = await connect()
            client = H2Client(transport, key, self.limits)
            if self._nursery is None:
                await trio.aclose_forcefully(transport)
                raise UpstreamFailed("the HTTP/2 pool is not running")
            await self._nursery.start(client.run)
            self._clients.setdefault(key, []).append(client)
            client.reserved += 1
            return client, False
        finally:
            del self._opening[key]
            event.set()

    async def discard(self, key: Hashable) -> None:
        for client in self._clients.pop(key, []):
            await client.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    await trio.sleep(min(self.idle_timeout / 2, 5.0))
                    await self._reap(trio.current_time())
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for clients in self._clients.values():
                    for client in clients:
                        await trio.aclose_forcefully(client.conn.transport)
                self._clients.clear()

    async def _reap(self, now: float) -> None:
        for key in list(self._clients):
            keep = []
            for client in self._clients[key]:
                idle = not client.conn.streams and client.reserved == 0
                if client.conn.closed or (idle and now - client.idle_since > self.idle_timeout):
                    await client.close()
                else:
                    keep.append(client)
            if keep:
                self._clients[key] = keep
            else:
                del self._clients[key]

    def forget_dead(self, key: Hashable) -> None:
        clients = self._clients.get(key)
        if clients:
            self._clients[key] = [c for c in clients if c.usable]

