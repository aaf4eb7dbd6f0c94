"""Inbound: the host's one mTLS listener in front of its local services.

Every connection must complete a TLS 1.3 handshake with a client certificate of our trust
domain; SNI names the local service wanted. Refusals (plaintext, no certificate, another CA,
another trust domain, an unknown service, a revoked certificate) are logged with the reason and
counted. HTTP services get each request parsed, counted with the caller's identity and marked
``x-meshd-source``; TCP services get the bytes pumped to the app.

A host may have one *permissive* service (``mtls = "permissive"``, for migrating a service into
the mesh): then the listener peeks at each connection's first byte. A TLS handshake record
(0x16) goes the mTLS way above; anything else, or nothing within ``DETECT_TIMEOUT`` (a protocol
where the server speaks first), is plaintext for that service: served with the source
``unknown``, no ``x-meshd-source`` header (nothing is authenticated), and counted with
``mtls="false"``. Hosts without a permissive service never peek.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import trio

from meshd.config.schema import HostConfig, LocalService, MTLSMode, Protocol
from meshd.metrics import Metrics
from meshd.proxy.exchange import RequestSource
from meshd.proxy.forward import (
    ClientConnection,
    ConnectFailed,
    proxy_request,
    serve_requests,
    upstream_request_head,
)
from meshd.proxy.http1 import ProtocolError, RequestHead
from meshd.proxy.pool import ConnectionPool
from meshd.proxy.pump import pump
from meshd.proxy.streams import accept_mtls
from meshd.proxy.tls import HandshakeRefused, TLSState

log = logging.getLogger(__name__)
access_log = logging.getLogger("meshd.access")

HANDSHAKE_TIMEOUT = 10.0
APP_CONNECT_TIMEOUT = 5.0
# Longer than the outbound pools' 30 s, so a peer drops its idle connection before we do.
PEER_IDLE_TIMEOUT = 75.0
# Loopback connections to apps are cheap to remake; stay under common app keep-alive timeouts.
APP_IDLE_TIMEOUT = 4.0
SOURCE_HEADER = b"x-meshd-source"
_QUIET_REFUSALS = {"plaintext", "handshake_eof", "handshake_timeout"}
# Permissive services: how long to wait for a first byte before taking the connection for a
# plaintext protocol whose server speaks first (a TLS client sends its ClientHello at once).
DETECT_TIMEOUT = 1.0
TLS_HANDSHAKE_RECORD = 0x16
UNKNOWN_SOURCE = "unknown"


@dataclass
class InboundContext:
    config: HostConfig
    tls: TLSState
    metrics: Metrics
    app_pool: ConnectionPool


class Inbound:
    def __init__(self, ctx: InboundContext) -> None:
        self.ctx = ctx
        self.permissive = next(
            (s for s in ctx.config.services if s.mtls is MTLSMode.PERMISSIVE), None)

    async def handle(self, transport: trio.SocketStream, conn: ClientConnection) -> None:
        ctx = self.ctx
        if self.permissive is not None and not await _speaks_tls(transport):
            await self._handle_plaintext(transport, conn, self.permissive)
            return
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                stream, service_name, source = await accept_mtls(transport, ctx.tls)
        except trio.TooSlowError:
            self._refuse(conn, "handshake_timeout", "no TLS handshake within "
                         f"{HANDSHAKE_TIMEOUT:g}s")
            await trio.aclose_forcefully(transport)
            return
        except HandshakeRefused as exc:
            self._refuse(conn, exc.reason, str(exc))
            await trio.aclose_forcefully(transport)
            return
        try:
            service = ctx.config.service(service_name)
            if service is None:  # TLSState only has identities for configured services
                self._refuse(conn, "unknown_service", f"no local service {service_name!r}")
                return
            ctx.metrics.inbound_connections.labels(service.name, "true").inc()
            if service.protocol is Protocol.TCP:
                await self._handle_tcp(stream, service, source)
            else:
                handler = _HTTPService(ctx, service, source)
                await serve_requests(stream, conn, handler.handle, PEER_IDLE_TIMEOUT,
                                     on_bad_request=handler.count_bad_request)
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle_plaintext(self, transport: trio.SocketStream, conn: ClientConnection,
                                service: LocalService) -> None:
        self.ctx.metrics.inbound_connections.labels(service.name, "false").inc()
        log.debug("inbound plaintext connection from %s for permissive service %s", conn.peer,
                  service.name)
        if service.protocol is Protocol.TCP:
            await self._handle_tcp(transport, service, UNKNOWN_SOURCE)
            return
        handler = _HTTPService(self.ctx, service, UNKNOWN_SOURCE, authenticated=False)
        await serve_requests(transport, conn, handler.handle, PEER_IDLE_TIMEOUT,
                             on_bad_request=handler.count_bad_request)

    def _refuse(self, conn: ClientConnection, reason: str, text: str) -> None:
        level = logging.INFO if reason in _QUIET_REFUSALS else logging.WARNING
        log.log(level, "inbound connection from %s refused (%s): %s", conn.peer, reason, text)
        self.ctx.metrics.connection_errors.labels("inbound", reason).inc()

    async def _handle_tcp(self, stream: trio.abc.HalfCloseableStream, service: LocalService,
                          source: str) -> None:
        m = self.ctx.metrics
        try:
            app = await _connect_app(service)
        except ConnectFailed as exc:
            log.warning("%s -> %s (tcp): %s; closing", source, service.name, exc)
            m.connection_errors.labels("inbound", exc.reason).inc()
            return
        m.tcp_connections.labels("inbound", source, service.name, "").inc()
        sent = m.tcp_bytes.labels("inbound", service.name, "sent")
        received = m.tcp_bytes.labels("inbound", service.name, "received")
        try:
            await pump(stream, app, count_a_to_b=sent.inc, count_b_to_a=received.inc)
        finally:
            await trio.aclose_forcefully(app)


class _HTTPService:
    """Requests from one authenticated peer connection to one local HTTP service."""

    def __init__(self, ctx: InboundContext, service: LocalService, source: str,
                 *, authenticated: bool = True) -> None:
        self.ctx = ctx
        self.service = service
        self.source = source
        self.key = ("app", service.address, service.port)
        # the caller's identity, for the app; a plaintext caller's is unknown: no header at all
        self.extra = ((SOURCE_HEADER, source.encode("ascii")),) if authenticated else ()

    async def handle(self, request: RequestHead, source: RequestSource,
                     conn: ClientConnection) -> bool:
        started = trio.current_time()
        head = upstream_request_head(
            request, forwarded_for=conn.peer, default_host=self.service.name,
            drop=(SOURCE_HEADER,), extra=self.extra)
        result = await proxy_request(
            request, source, source.stream, conn, pool=self.ctx.app_pool, key=self.key,
            connect=self._connect, upstream_head=head, request_timeout=None)
        m = self.ctx.metrics
        elapsed = trio.current_time() - started
        m.requests.labels("inbound", self.source, self.service.name, "",
                          str(result.status)).inc()
        m.request_duration.labels("inbound", self.service.name, "").observe(elapsed)
        if result.detail and result.status >= 500:
            log.warning("%s -> %s (local app): %d %s", self.source, self.service.name,
                        result.status, result.detail)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("inbound %s -> %s %s %s %d %.1fms", self.source, self.service.name,
                            request.method.decode("ascii", "replace"),
                            request.target.decode("ascii", "replace")[:200], result.status,
                            elapsed * 1000)
        return result.keep

    def count_bad_request(self, exc: ProtocolError) -> None:
        self.ctx.metrics.requests.labels("inbound", self.source, self.service.name, "",
                                         str(exc.status)).inc()

    async def _connect(self) -> trio.SocketStream:
        try:
            return await _connect_app(self.service)
        except ConnectFailed as exc:
            self.ctx.metrics.connection_errors.labels("inbound", exc.reason).inc()
            raise


async def _speaks_tls(transport: trio.SocketStream) -> bool:
    """Whether the client's first byte starts a TLS handshake record (peeked, not consumed).
    No byte within ``DETECT_TIMEOUT``: plaintext whose server speaks first."""
    with trio.move_on_after(DETECT_TIMEOUT):
        try:
            first = await transport.socket.recv(1, socket.MSG_PEEK)
        except OSError:
            return True  # let the TLS path fail and report it
        return not first or first[0] == TLS_HANDSHAKE_RECORD
    return False


async def _connect_app(service: LocalService) -> trio.SocketStream:
    where = f"{service.address}:{service.port}"
    try:
        with trio.fail_after(APP_CONNECT_TIMEOUT):
            return await trio.open_tcp_stream(service.address, service.port)
    except trio.TooSlowError:
        raise ConnectFailed("app_connect_timeout", f"connecting to {where} timed out") from None
    except OSError as exc:
        raise ConnectFailed("app_connect_failed",
                            f"cannot connect to {service.name} at {where}: "
                            f"{exc.strerror or exc}") from exc
