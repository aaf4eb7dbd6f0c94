"""HTTP proxying shared by both directions: the client side of it.

``serve_requests`` runs a client connection (keep-alive, idle timeout, a deadline on each request
head against slowloris (408), 4xx on malformed input, drain) and hands each request head to a
handler; ``answer_locally`` and ``refuse_large_body`` are what a handler answers itself.
Forwarding a request (pooled connections, the exchange, retries, 502/504) is
``meshd.proxy.attempts``, the one path both directions take.

A connection idle between requests for ``PARK_AFTER`` gives up its task when its server offers
to hold it (``ClientConnection.park``: plaintext HTTP/1.1 client connections, in the server's
keep-alive room): ``serve_requests`` then returns with the connection open, and the server calls
it again, with a fresh ``RequestSource``, when the client's next bytes arrive.

``Expect: 100-continue`` is end to end: the header goes upstream and the upstream's ``100
Continue`` is relayed (``Exchange``), so the app that will read the body decides whether it
wants it; meshd never answers 100 itself. What meshd refuses on its own (403, 413 on a
Content-Length over the limit) is answered before any body is read, and the connection closed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio

from meshd.proxy.core.attempt import ERROR_HEADER
from meshd.proxy.core.http1 import (
    Data,
    Header,
    ProtocolError,
    RequestHead,
)
from meshd.proxy.core.http1_write import simple_response
from meshd.proxy.exchange import (
    STREAM_ERRORS,
    ClientGone,
    RequestSource,
)
from meshd.proxy.h2conn import H2Request, serve_h2

log = logging.getLogger(__name__)

# From a request's first byte to the end of its head: a client trickling a head byte by byte
# (slowloris) holds a connection this long at most, then gets a 408.
HEAD_TIMEOUT = 10.0
# how long a drain waits for the first request of a connection accepted before it began
FIRST_REQUEST_GRACE = 1.0
# How long a connection idle between requests keeps its task before it is offered to its
# server's keep-alive room (``ClientConnection.park``): a busy client's next request is
# nearly always sooner, and waking a parked connection costs a new task and parser.
PARK_AFTER = 0.02


@dataclass(eq=False)
class ClientConnection:
    """One accepted connection, as the drain logic sees it."""

    peer: str
    draining: bool = False
    idle_scope: trio.CancelScope | None = None
    served: bool = False  # a request was read on it (a drain closes it when idle again)
    # what a drain calls instead (HTTP/2: GOAWAY, then the streams in flight finish)
    drain_hook: Callable[[], None] | None = None
    # Set by a server that can hold this connection idle without a task: ``park(stream,
    # resume, idle_timeout)`` takes ``stream`` over if it is the server's own socket stream
    # (True: the calling task returns, leaving it open; ``resume()`` serves its next request in
    # a new task), or declines (False: the caller waits as usual).
    park: Callable[[trio.abc.Stream, Callable[[], Awaitable[None]], float], bool] | None = None
    # times it was parked (``park``): the task that parked it, seeing the count move, leaves it
    # open, whatever happens to it after (woken and served by another task meanwhile)
    parks: int = 0

    def set_drain_hook(self, hook: Callable[[], None] | None) -> None:
        self.drain_hook = hook


async def answer_locally(source: RequestSource | H2Request, request: RequestHead,
                         conn: ClientConnection, status: int, text: str,
                         headers: list[Header] | None = None) -> bool:
    """Answer the request ourselves, on ``source``'s connection. The connection stays open
    only if the request had no body (an unread body would be taken for the next request).
    False if it must close. An HTTP/2 stream is answered on its own (a gRPC call with its
    gRPC status: ``h2conn.H2Request.answer``)."""
    if isinstance(source, H2Request):
        code = next((v.decode("ascii", "replace") for n, v in headers or ()
                     if n == ERROR_HEADER), "")
        return await source.answer(status, text, headers or [], code=code)
    source.take_empty_body()
    close = not (request.keep_alive and source.message_done and not conn.draining)
    try:
        await source.stream.send_all(simple_response(status, text, close=close,
                                                     headers=headers or []))
    except STREAM_ERRORS:
        return False
    return not close


# What ``discard_body`` reads at most before giving up on keeping the connection.
DISCARD_LIMIT = 64 * 1024
DISCARD_TIMEOUT = 2.0


async def discard_body(source: RequestSource | H2Request, request: RequestHead,
                       limit: int = DISCARD_LIMIT) -> None:
    """Read what is left of ``request``'s body and throw it away, up to ``limit`` bytes and
    ``DISCARD_TIMEOUT`` seconds, before meshd answers a request it could not forward: the connection
    then stays usable, and the answer is not lost to a reset caused by unread bytes. A longer
    or slower body is left (the answer then closes the connection). An HTTP/2 stream needs
    none of this: its body is refused with a reset after the answer."""
    if isinstance(source, H2Request):
        return
    source.take_empty_body()
    if source.message_done or request.upgrade:
        return
    if request.content_length is not None and request.content_length > limit:
        return
    read = 0
    with trio.move_on_after(DISCARD_TIMEOUT):
        try:
            while not source.message_done and read <= limit:
                event = await source.next_event()
                if event is None:
                    return
                if isinstance(event, Data):
                    read += len(event.data)
        except (ProtocolError, ClientGone):
            return


async def refuse_large_body(source: RequestSource | H2Request, request: RequestHead,
                            conn: ClientConnection, limit: int | None) -> bool | None:
    """Apply a body size limit to ``request``: a Content-Length over it is answered 413 at once
    (returns whether the connection stays open); otherwise a chunked body is cut at the limit
    as it streams (``RequestSource.body_limit``) and this returns None."""
    if limit is None:
        return None
    if request.content_length is not None and request.content_length > limit:
        return await answer_locally(source, request, conn, 413,
                                    f"request body larger than {limit} bytes")
    source.body_limit = limit
    return None


Handler = Callable[[RequestHead, RequestSource, ClientConnection], Awaitable[bool]]
# a handler of both versions: an HTTP/2 request comes with its stream as the source
AnyHandler = Callable[[RequestHead, RequestSource | H2Request, ClientConnection],
                      Awaitable[bool]]


async def serve_http(stream: trio.abc.Stream, conn: ClientConnection, handle: AnyHandler,
                     idle_timeout: float, *, h2: bool,
                     on_bad_request: Callable[[ProtocolError], None] | None = None) -> None:
    """Serve one client connection, HTTP/2 (``h2``: chosen by ALPN, or the h2c preface) or
    HTTP/1.1, each request to ``handle``; a drain of ``conn`` reaches either."""
    if not h2:
        await serve_requests(stream, conn, handle, idle_timeout, on_bad_request=on_bad_request)
        return

    async def each(head: RequestHead, request: H2Request) -> None:
        await handle(head, request, conn)

    await serve_h2(stream, each, idle_timeout, on_bad_request=on_bad_request,
                   draining=lambda: conn.draining, set_drain_hook=conn.set_drain_hook,
                   peer=conn.peer)


async def serve_requests(client: trio.abc.Stream, conn: ClientConnection, handle: Handler,
                         idle_timeout: float,
                         on_bad_request: Callable[[ProtocolError], None] | None = None,
                         head_timeout: float = HEAD_TIMEOUT, *, woken: bool = False) -> None:
    """The keep-alive loop of one client connection: each request head goes to ``handle``,
    which returns whether the connection may carry another. Between requests the connection
    may idle ``idle_timeout`` (then it is closed quietly); from a request's first byte its
    head must be complete within ``head_timeout`` (else 408). Malformed input is answered with
    its 4xx and the connection closed. Returns when the connection is done (the caller
    closes it), or parked (below).

    Each wait has its own cancel scope, entered only when the wait happens (a head that came
    whole in one read needs no head deadline), and the handler runs outside them: a deadline
    or a drain that lands just as a request arrives finds the read already done, and the
    request is served.

    A drain closes connections idle between requests at once, but gives one whose first
    request is still on its way ``FIRST_REQUEST_GRACE``: its client connected before the drain
    began and, not having reused a connection, would not retry a request left unanswered.

    Idle between requests with nothing read ahead for ``PARK_AFTER``, a connection is offered
    to ``conn.park`` (when its server set one): a parked connection waits for its next bytes
    without a task, so this returns with it open, and the server later calls this again
    (``resume``, with a fresh ``RequestSource``) to serve it, as the same connection. The rest
    of its idle timeout and a drain then act in the server's waiting room instead of here. A
    connection ``woken`` there has its bytes read even if a drain began since: they are a
    request that arrived while it was idle, and it is answered (then closed).
    """
    source = RequestSource(client)
    while woken or not (conn.draining and conn.served):
        woken = False
        try:
            # Between requests under load the next one is usually here already: read it
            # without the idle wait's cancel scope (docs/performance.md, "The HTTP/1.1 hop").
            if not source.has_input and not source.fill_nowait():
                wait = min(idle_timeout, FIRST_REQUEST_GRACE) if conn.draining else idle_timeout
                # idle between requests: a moment in this task, then parked if the server can
                park = conn.park if conn.served and wait > PARK_AFTER else None
                while True:
                    with trio.move_on_after(wait if park is None else PARK_AFTER) as idle:
                        conn.idle_scope = idle
                        try:
                            await source.fill()
                        finally:
                            conn.idle_scope = None
                    if not idle.cancelled_caught:
                        break
                    if park is None or conn.draining:
                        return  # idle too long, or a drain
                    wait -= PARK_AFTER
                    if park(client, partial(serve_requests, client, conn, handle, idle_timeout,
                                            on_bad_request, head_timeout, woken=True), wait):
                        return  # parked: no task while idle (docs/performance.md, round two)
                    park = None  # (not this connection: the rest of the wait here)
            if not source.has_event:  # part of a head came: the rest has a deadline
                with trio.move_on_after(head_timeout) as waited:
                    while not source.has_event:
                        await source.fill()
                if waited.cancelled_caught:
                    raise ProtocolError(f"request head not complete within {head_timeout:g}s",
                                        408)
            event = await source.next_event()
        except ProtocolError as exc:
            await _refuse(client, conn, exc, on_bad_request)
            return
        except ClientGone:
            return
        if event is None:
            return
        if not isinstance(event, RequestHead):  # a handler consumes every body it starts
            raise AssertionError(f"request events out of order: {event!r}")
        conn.served = True
        if not await handle(event, source, conn):
            return


async def _refuse(client: trio.abc.Stream, conn: ClientConnection, exc: ProtocolError,
                  on_bad_request: Callable[[ProtocolError], None] | None) -> None:
    log.info("bad request from %s: %s", conn.peer, exc)
    if on_bad_request is not None:
        on_bad_request(exc)
    try:
        await client.send_all(simple_response(exc.status, str(exc), close=True))
    except STREAM_ERRORS:
        pass
