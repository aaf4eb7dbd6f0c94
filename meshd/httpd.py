"""A small HTTP/1.1 server for meshd's control plane: the embedded registry, the CA API and the
admin endpoint.

It is not the data plane (that lives in ``meshd.proxy``): requests are read whole (bounded by
``max_body``), handed to one async handler, and answered with a complete ``Response``. What it does
take care of, because every control-plane server needs it:

* keep-alive and pipelining (httptools parses, ``should_keep_alive`` is read inside the callback);
* a header-read timeout (slowloris) and request size limits, answered with 408 / 413 / 431;
* malformed requests get a 400 and the connection is closed, never a crash;
* while a handler runs (a blocking query can wait ten minutes) the connection is still watched: if
  the client goes away, the handler is cancelled instead of holding its watcher until the deadline;
* the peer's TLS certificate, when there is one, is on the request for mutual-TLS endpoints;
* connection caps at accept (``meshd.conns.guard``: per listener, per source address, and what
  the open file limit leaves room for), and no TLS object nor parser for a connection before
  its first bytes: an idle connection costs a task and a socket.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httptools
import trio

from meshd.config import hostport as config_hostport
from meshd.config.schema import ListenerLimits
from meshd.conns.guard import ConnectionGuard, ListenerGuard, accept_loop
from meshd.metrics import Metrics

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
DEFAULT_MAX_BODY = 1024 * 1024
HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 75.0
# what a server that does not say otherwise accepts: no cap per source (an app behind meshd
# sees all its clients come from meshd's one address)
DEFAULT_LIMITS = ListenerLimits(10_000)


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    path: str
    query: Mapping[str, tuple[str, ...]]
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    remote: tuple[str, int] | None = None
    peer_cert_der: bytes | None = None

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def param(self, name: str, default: str | None = None) -> str | None:
        """The first value of a query parameter (``""`` for a bare ``?flag``)."""
        values = self.query.get(name)
        return values[0] if values else default

    def params(self, name: str) -> tuple[str, ...]:
        return self.query.get(name, ())

    def has_param(self, name: str) -> bool:
        return name in self.query

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(
        cls, obj: Any, status: int = 200, headers: list[tuple[str, str]] | None = None,
        *, pretty: bool = False,
    ) -> Response:
        if pretty:
            text = json.dumps(obj, indent=4) + "\n"
        else:
            text = json.dumps(obj, separators=(",", ":"))
        hdrs = [("Content-Type", "application/json")]
        hdrs.extend(headers or [])
        return cls(status, text.encode(), hdrs)

    @classmethod
    def text(
        cls, text: str, status: int = 200, headers: list[tuple[str, str]] | None = None,
        content_type: str = "text/plain; charset=utf-8",
    ) -> Response:
        hdrs = [("Content-Type", content_type)]
        hdrs.extend(headers or [])
        return cls(status, text.encode(), hdrs)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


Handler = Callable[[Request], Awaitable[Response]]


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _RequestReader:
    """Feeds bytes to httptools and collects complete requests (pure: no I/O)."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self._parser = httptools.HttpRequestParser(self)
        self.done: list[tuple[str, str, list[tuple[str, str]], bytes, bool]] = []
        self._reset()
        self.header_bytes = 0

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._body_len = 0
        self.header_bytes = 0

    @property
    def in_progress(self) -> bool:
        return bool(self._url) or bool(self._headers)

    def feed(self, data: bytes | bytearray) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise _BadRequest(400, "upgrade not supported on this endpoint") from None
        except httptools.HttpParserError as exc:
            # httptools wraps an exception raised in a callback (our 413/414/431) in
            # HttpParserCallbackError, keeping the original as __context__.
            if isinstance(exc.__context__, _BadRequest):
                raise exc.__context__ from None
            raise _BadRequest(400, f"malformed request: {exc}") from None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self.header_bytes += len(url)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _BadRequest(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES or len(self._headers) >= MAX_HEADERS:
            raise _BadRequest(431, "request header fields too large")
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        length = next((v for k, v in self._headers if k == "content-length"), None)
        if length is not None and length.isdigit() and int(length) > self._max_body:
            raise _BadRequest(413, f"request body larger than {self._max_body} bytes")

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self._max_body:
            raise _BadRequest(413, f"request body larger than {self._max_body} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("ascii", "replace")
        keep_alive = self._parser.should_keep_alive()
        self.done.append(
            (method, self._url.decode("latin-1"), self._headers, b"".join(self._body), keep_alive)
        )
        self._url = b""
        self._headers = []


def _parse_target(target: str) -> tuple[str, dict[str, tuple[str, ...]]]:
    parts = urlsplit(target)
    raw = parse_qs(parts.query, keep_blank_values=True)
    return unquote(parts.path), {k: tuple(v) for k, v in raw.items()}


def _render(response: Response, keep_alive: bool, head_only: bool = False) -> bytes:
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    names = set()
    for key, value in response.headers:
        names.add(key.lower())
        lines.append(f"{key}: {value}")
    if "content-length" not in names:
        lines.append(f"Content-Length: {len(response.body)}")
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


async def _call_watching_disconnect(
    stream: trio.abc.Stream, handler: Handler, request: Request, reader: _RequestReader
) -> Response | None:
    """Run the handler while reading the connection; a client that hangs up cancels it.

    Bytes that arrive meanwhile (a pipelined request) are fed to the reader, not lost.
    Returns None when the client went away.
    """
    result: list[Response] = []
    gone = False

    async with trio.open_nursery() as nursery:

        async def run() -> None:
            result.append(await handler(request))
            nursery.cancel_scope.cancel()

        async def watch() -> None:
            nonlocal gone
            try:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    reader.feed(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, _BadRequest):
                pass
            gone = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(run)
        nursery.start_soon(watch)
    if gone and not result:
        return None
    return result[0] if result else None


async def serve_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    header_timeout: float = HEADER_TIMEOUT,
    idle_timeout: float = IDLE_TIMEOUT,
    watch_disconnect: bool = True,
) -> None:
    """Serve HTTP/1.1 requests on one connection until it closes."""
    remote: tuple[str, int] | None = None
    peer_cert: bytes | None = None
    try:
        if isinstance(stream, trio.SSLStream):
            with trio.fail_after(header_timeout):
                await stream.do_handshake()
            peer_cert = stream.getpeercert(binary_form=True)
            raw = stream.transport_stream
        else:
            raw = stream
        if isinstance(raw, trio.SocketStream):
            try:
                peer = raw.socket.getpeername()
                remote = (str(peer[0]), int(peer[1]))
            except (OSError, IndexError):
                remote = None
    except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        log.info("closing connection before first request: TLS handshake failed: %s", exc)
        await trio.aclose_forcefully(stream)
        return

    reader: _RequestReader | None = None  # made with the first bytes
    try:
        while True:
            # Wait for a whole request; the first byte may take up to idle_timeout, the rest of
            # the head and body must arrive within header_timeout of the first byte.
            deadline_first = trio.current_time() + idle_timeout
            deadline_rest: float | None = None
            while reader is None or not reader.done:
                deadline = deadline_rest if deadline_rest is not None else deadline_first
                with trio.move_on_at(deadline) as scope:
                    data = await stream.receive_some(65536)
                if scope.cancelled_caught:
                    if reader is not None and reader.in_progress:
                        await _send_error(stream, 408, "request not received in time")
                    return
                if not data:
                    return
                if deadline_rest is None:
                    deadline_rest = trio.current_time() + header_timeout
                if reader is None:
                    reader = _RequestReader(max_body)
                reader.feed(data)

            method, target, headers, body, keep_alive = reader.done.pop(0)
            path, query = _parse_target(target)
            request = Request(
                method=method, target=target, path=path, query=query, headers=tuple(headers),
                body=body, remote=remote, peer_cert_der=peer_cert,
            )
            try:
                if watch_disconnect and not reader.done and not isinstance(stream, trio.SSLStream):
                    # (cancelling an SSLStream read would break the TLS session, so TLS endpoints,
                    # which never block long, skip the watch)
                    response = await _call_watching_disconnect(stream, handler, request, reader)
                    if response is None:
                        return
                else:
                    response = await handler(request)
            except Exception:
                log.exception("handler failed for %s %s", method, path)
                response = Response.text("internal error\n", 500)
            await stream.send_all(_render(response, keep_alive, head_only=method == "HEAD"))
            if not keep_alive:
                return
    except _BadRequest as exc:
        await _send_error(stream, exc.status, exc.reason)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _send_error(stream: trio.abc.Stream, status: int, reason: str) -> None:
    with trio.move_on_after(1):
        try:
            await stream.send_all(_render(Response.text(reason + "\n", status), keep_alive=False))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def parse_hostport(addr: str) -> tuple[str, int]:
    """A listen address: ``"127.0.0.1:8500"`` -> ("127.0.0.1", 8500); ``"[::1]:80"`` -> ("::1",
    80); a host name is left to the listener, ``":8500"`` means 127.0.0.1 and port 0 lets the
    kernel pick. Raises ValueError."""
    if addr.startswith(":"):
        addr = "127.0.0.1" + addr
    return config_hostport.parse_hostport(addr, allow_port_zero=True, allow_names=True)


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    inherited: socket.socket | None = None,
    limits: ListenerLimits = DEFAULT_LIMITS,
    listener: str = "http",
    metrics: Metrics | None = None,
    header_timeout: float = HEADER_TIMEOUT,
    idle_timeout: float = IDLE_TIMEOUT,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port and serve until cancelled. ``task_status.started`` gets the listeners
    once they accept connections (so port 0 callers can read the real port). ``inherited``: a
    socket already listening on that address, served instead of binding one (a restart; only
    this process's descriptor is closed at the end, the socket lives on where it is held).

    ``limits`` caps the connections at accept; refusals are logged as from ``listener`` and,
    with ``metrics``, counted there. Over TLS, a connection must send its first bytes and
    finish its handshake within ``header_timeout`` of being accepted."""
    sockets = ([trio.SocketListener(trio.socket.from_stdlib_socket(inherited))]
               if inherited is not None else await trio.open_tcp_listeners(port, host=host))
    guard = ConnectionGuard(metrics=metrics)
    admission = guard.listener(listener, limits)

    async def conn(raw: trio.SocketStream, _source: str) -> None:
        if ssl_context is None:
            await serve_connection(raw, handler, max_body=max_body,
                                   header_timeout=header_timeout, idle_timeout=idle_timeout)
            return
        try:
            with trio.fail_after(header_timeout):  # from accept to the end of the handshake
                stream = await _start_tls(raw, ssl_context)
        except trio.TooSlowError:
            log.info("closing connection before first request: no TLS handshake within %gs",
                     header_timeout)
            await trio.aclose_forcefully(raw)
            return
        if stream is not None:
            await serve_connection(stream, handler, max_body=max_body,
                                   header_timeout=header_timeout, idle_timeout=idle_timeout)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(guard.run)
            async with trio.open_nursery() as connections:
                # clients speak first: until their first bytes they wait without a task
                first_byte = idle_timeout if ssl_context is None else header_timeout
                for sock in sockets:  # (the accept loops keep the nursery open)
                    connections.start_soon(partial(
                        _accept_then_close, sock, admission, conn, connections, first_byte))
                task_status.started(sockets)
    finally:
        for sock in sockets:
            sock.socket.close()


async def _accept_then_close(sock: trio.SocketListener, admission: ListenerGuard,
                             conn: Callable[[trio.SocketStream, str], Awaitable[None]],
                             connections: trio.Nursery, first_byte: float) -> None:
    """Accept until cancelled; the listening socket is closed at once then, not after the
    connections still open (a server started again on the same port must find it free)."""
    try:
        await accept_loop(sock, admission, conn, connections, first_byte_timeout=first_byte)
    finally:
        sock.socket.close()


async def _start_tls(raw: trio.SocketStream,
                     context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream] | None:
    """The server side of TLS on an accepted connection, handshake done, or None (closed,
    logged). The caller bounds the time. The TLS object (and OpenSSL's buffers) is only made
    once the client's first bytes are there."""
    try:
        if not await raw.socket.recv(1, socket.MSG_PEEK):  # EOF: the client gave up
            await trio.aclose_forcefully(raw)
            return None
        stream = trio.SSLStream(raw, context, server_side=True, https_compatible=True)
        await stream.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        log.info("closing connection before first request: TLS handshake failed: %s", exc)
        await trio.aclose_forcefully(raw)
        return None
    return stream
