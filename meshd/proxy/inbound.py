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

Authorization: each HTTP request is checked against the service's
``[destinations.NAME.authorization]`` rules in the route table in force when it arrives (read
per request, so a changed rule applies to keep-alive connections already open); a denied one
gets a 403 and a log line naming the rule. A TCP connection is checked when it opens and again
whenever the route table changes, and closed once no longer allowed. The same table's
``policy.max_request_bytes`` bounds request bodies (413).

An app that cannot be connected to (refused, timed out) gets its caller a 503 with
``x-meshd-error: app-connect-failed`` / ``app-connect-timeout``: the request never reached the
app, and the caller's meshd retries it on another endpoint, whatever its method. The app's own
responses lose any ``x-meshd-error``/``x-meshd-reason`` header on the way out, so that claim
comes only from this meshd (and reaches the caller's meshd only over mTLS).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import trio

from meshd.config.schema import (
    Authorization,
    HostConfig,
    LocalService,
    MTLSMode,
    Protocol,
    RouteTable,
)
from meshd.identity.tls import HandshakeRefused, TLSState
from meshd.metrics import Metrics
from meshd.proxy.access import AccessEntry, AccessLog
from meshd.proxy.attempts import OWN_HEADERS, Attempts
from meshd.proxy.core.authz import DEFAULT_DENY, Caller, Verdict, authorize, normalize_path
from meshd.proxy.core.grpc import grpc_request, status_for_meshd_error
from meshd.proxy.core.h2 import request_fields, wants_trailers
from meshd.proxy.core.http1 import ProtocolError, RequestHead
from meshd.proxy.core.http1_write import upstream_request_fields, upstream_request_head
from meshd.proxy.core.trace import RequestIdentity, identify
from meshd.proxy.core.view import MeshView, ViewCell
from meshd.proxy.exchange import RequestSource
from meshd.proxy.forward import (
    ClientConnection,
    answer_locally,
    refuse_large_body,
    serve_http,
)
from meshd.proxy.h2conn import H2Pool, H2Request, starts_h2
from meshd.proxy.pool import ConnectFailed, ConnectionPool
from meshd.proxy.pump import pump
from meshd.proxy.sockio import SocketConnection, connect_tcp
from meshd.proxy.streams import accept_mtls, negotiated_h2
from meshd.tracing.spans import SERVER
from meshd.tracing.tracer import Tracer

log = logging.getLogger(__name__)

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


class ServiceRules(NamedTuple):
    """What a route table says about requests to one local service."""

    authorization: Authorization | None
    max_request_bytes: int | None


@dataclass
class InboundContext:
    config: HostConfig
    tls: TLSState
    metrics: Metrics
    app_pool: ConnectionPool
    view: ViewCell = field(default_factory=ViewCell)  # read per request: authorization, limits
    access: AccessLog = field(default_factory=AccessLog)
    # connections to apps that speak h2c (``protocol = "http2"`` or ``"grpc"``)
    app_h2_pool: H2Pool = field(default_factory=lambda: H2Pool(APP_IDLE_TIMEOUT))
    tracer: Tracer = field(default_factory=Tracer.off)
    # each service's rules as read from one route table, kept until the table changes (the
    # table searches its destinations one by one on every read)
    _rules_of: RouteTable | None = field(default=None, init=False, repr=False)
    _rules: dict[str, ServiceRules] = field(default_factory=dict, init=False, repr=False)

    def rules(self, view: MeshView, service: str) -> ServiceRules:
        """``service``'s authorization and request body limit in ``view``'s route table."""
        routes = view.routes
        if routes is not self._rules_of:
            self._rules_of, self._rules = routes, {}
        found = self._rules.get(service)
        if found is None:
            dest = routes.get(service)
            found = self._rules[service] = ServiceRules(
                routes.authorization_for(service),
                dest.policy.max_request_bytes if dest is not None else None)
        return found

    def authorize(self, view: MeshView, service: str, caller: Caller,
                  request: RequestHead | None = None) -> Verdict:
        """The verdict of ``service``'s rules in ``view`` on ``request`` (None: a TCP
        connection); a denial is logged with the rule and counted."""
        authorization = self.rules(view, service).authorization
        if authorization is None:
            return authorize(None, caller)
        if request is None:
            verdict = authorize(authorization, caller)
        else:
            verdict = authorize(authorization, caller, request.method.decode("ascii", "replace"),
                                normalize_path(request.target))
        if not verdict.allowed:
            what = ("tcp connection" if request is None else
                    f"{request.method.decode('ascii', 'replace')} "
                    f"{request.target[:200].decode('ascii', 'backslashreplace')}")
            log.warning("authorization: %s -> %s %s denied by %s", caller.service, service,
                        what, _rule_text(verdict.rule))
            self.metrics.authz_denied.labels(service, caller.service, verdict.rule).inc()
        return verdict


def _rule_text(rule: str) -> str:
    return rule if rule == DEFAULT_DENY else f"rule {rule!r}"


class Inbound:
    def __init__(self, ctx: InboundContext) -> None:
        self.ctx = ctx
        self.permissive = next(
            (s for s in ctx.config.services if s.mtls is MTLSMode.PERMISSIVE), None)

    async def handle(self, transport: SocketConnection, conn: ClientConnection) -> None:
        ctx = self.ctx
        if self.permissive is not None and not await _speaks_tls(transport):
            await self._handle_plaintext(transport, conn, self.permissive)
            return
        timeout = ctx.config.inbound_handshake_timeout
        try:
            # One deadline from accept to the end of the handshake. The TLS state (an SSLObject
            # and its buffers, tens of KB) is only made once the client's first bytes are
            # there: a connection that sends nothing costs a task and a socket, no more.
            with trio.fail_after(timeout):
                try:
                    first = await transport.peek(1)
                except trio.BrokenResourceError:
                    first = b""
                if not first:  # gone before its first byte: counted, not worth a log line
                    log.debug("inbound connection from %s closed before any byte", conn.peer)
                    ctx.metrics.connection_errors.labels("inbound", "handshake_eof").inc()
                    return
                stream, service_name, source = await accept_mtls(transport, ctx.tls)
        except trio.TooSlowError:
            self._refuse(conn, "handshake_timeout", f"no TLS handshake within {timeout:g}s")
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
                await self._handle_tcp(stream, service, Caller(source))
            else:
                handler = _HTTPService(ctx, service, source)
                await handler.serve(stream, conn, h2=negotiated_h2(stream))
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle_plaintext(self, transport: SocketConnection, conn: ClientConnection,
                                service: LocalService) -> None:
        self.ctx.metrics.inbound_connections.labels(service.name, "false").inc()
        log.debug("inbound plaintext connection from %s for permissive service %s", conn.peer,
                  service.name)
        if service.protocol is Protocol.TCP:
            await self._handle_tcp(transport, service, Caller(UNKNOWN_SOURCE, False))
            return
        handler = _HTTPService(self.ctx, service, UNKNOWN_SOURCE, authenticated=False)
        await handler.serve(transport, conn, h2=await starts_h2(transport))

    def _refuse(self, conn: ClientConnection, reason: str, text: str) -> None:
        level = logging.INFO if reason in _QUIET_REFUSALS else logging.WARNING
        log.log(level, "inbound connection from %s refused (%s): %s", conn.peer, reason, text)
        self.ctx.metrics.connection_errors.labels("inbound", reason).inc()

    async def _handle_tcp(self, stream: trio.abc.HalfCloseableStream, service: LocalService,
                          caller: Caller) -> None:
        ctx = self.ctx
        m = ctx.metrics
        source = caller.service
        if not ctx.authorize(ctx.view.current, service.name, caller).allowed:
            return  # closed by the caller of this method
        try:
            app = await _connect_app(service)
        except ConnectFailed as exc:
            log.warning("%s -> %s (tcp): %s; closing", source, service.name, exc)
            m.connection_errors.labels("inbound", exc.reason).inc()
            return
        m.tcp_connections.labels("inbound", source, service.name, service.version).inc()
        sent = m.tcp_bytes.labels("inbound", service.name, "sent")
        received = m.tcp_bytes.labels("inbound", service.name, "received")
        with trio.CancelScope() as connection:

            def recheck(view: MeshView) -> None:
                # A new route table: the connection lives on only if still allowed.
                if not ctx.authorize(view, service.name, caller).allowed:
                    log.info("%s -> %s (tcp): closing, no longer allowed (route table "
                             "generation %d)", source, service.name, view.generation)
                    connection.cancel()

            stop_watching = ctx.view.watch_routes(recheck)
            try:
                await pump(stream, app, count_a_to_b=sent.inc, count_b_to_a=received.inc)
            finally:
                stop_watching()
                await trio.aclose_forcefully(app)


class _HTTPService:
    """Requests from one authenticated peer connection to one local HTTP service."""

    def __init__(self, ctx: InboundContext, service: LocalService, source: str,
                 *, authenticated: bool = True) -> None:
        self.ctx = ctx
        self.service = service
        self.source = source
        self.caller = Caller(source, authenticated)
        self.key = ("app", service.address, service.port)
        self.h2_key = ("app-h2", service.address, service.port)
        self.connect = self._connect  # bound once, not per request
        # the caller's identity, for the app; a plaintext caller's is unknown: no header at all
        self.extra = ((SOURCE_HEADER, source.encode("ascii")),) if authenticated else ()
        self.endpoint = f"{service.address}:{service.port}"  # for access lines and spans
        self.app_h2 = service.protocol.app_h2  # read once, not per request

    async def serve(self, stream: trio.abc.Stream, conn: ClientConnection, *, h2: bool) -> None:
        """Serve a caller's connection: HTTP/2 (ALPN ``h2``, or h2c in plaintext) or
        HTTP/1.1."""
        await serve_http(stream, conn, self.handle, PEER_IDLE_TIMEOUT, h2=h2,
                         on_bad_request=self.count_bad_request)

    async def handle(self, request: RequestHead, source: RequestSource | H2Request,
                     conn: ClientConnection) -> bool:
        ctx = self.ctx
        started = trio.current_time()
        view = ctx.view.current  # read once per request: a rule change applies to the next
        ids = identify(request.headers, sample=ctx.tracer.sample)
        if not ctx.authorize(view, self.service.name, self.caller, request).allowed:
            text = f"access to {self.service.name} denied"
            keep = await answer_locally(source, request, conn, 403, text)
            self._record(request, started, ids, status=403, detail=text)
            return keep
        limit = ctx.rules(view, self.service.name).max_request_bytes
        refused = await refuse_large_body(source, request, conn, limit)
        if refused is not None:
            self._record(request, started, ids, status=413,
                         detail="request body too large")
            return refused
        # a route without retries, to the local app; meshd's own headers are meshd's: an app
        # cannot claim it never saw a request (x-meshd-error: app-connect-*)
        if self.app_h2:  # h2c to the app, whatever the caller spoke
            fields = upstream_request_fields(
                request, forwarded_for=conn.peer, default_host=self.service.name,
                drop=(SOURCE_HEADER,), extra=self.extra, ids=ids)
            h2_fields = request_fields(request.method, request.target, fields,
                                       trailers=wants_trailers(request.headers)
                                       or grpc_request(request.headers),
                                       length=request.content_length)
            attempts = Attempts(request, source, conn, pool=ctx.app_pool, key=self.h2_key,
                                connect=self.connect, upstream_head=b"", timeout=None,
                                drop_response=OWN_HEADERS, h2_pool=ctx.app_h2_pool,
                                upstream_fields=h2_fields)
        else:
            head = upstream_request_head(
                request, forwarded_for=conn.peer, default_host=self.service.name,
                drop=(SOURCE_HEADER,), extra=self.extra, ids=ids)
            attempts = Attempts(request, source, conn, pool=ctx.app_pool, key=self.key,
                                connect=self.connect, upstream_head=head, timeout=None,
                                drop_response=OWN_HEADERS)
        result = await attempts.run()
        if result.detail and result.status >= 500:
            log.warning("%s -> %s (local app): %d %s", self.source, self.service.name,
                        result.status, result.detail)
        self._record(request, started, ids, status=result.status, detail=result.detail,
                     error=result.code, request_bytes=result.request_bytes,
                     response_bytes=result.response_bytes, grpc_status=result.grpc_status)
        return result.keep

    def _record(self, request: RequestHead, started: float, ids: RequestIdentity, *,
                status: int, detail: str, error: str = "", request_bytes: int = 0,
                response_bytes: int = 0, grpc_status: int | None = None) -> None:
        m = self.ctx.metrics
        elapsed = trio.current_time() - started
        if grpc_status is None and status != 200 and grpc_request(request.headers):
            grpc_status = int(status_for_meshd_error(status, error))  # meshd's own answer
        grpc = "" if grpc_status is None else str(grpc_status)
        m.request_done("inbound", self.source, self.service.name, self.service.version, status,
                       elapsed, mtls=self.caller.authenticated, request_bytes=request_bytes,
                       response_bytes=response_bytes, grpc_status=grpc)
        access = self.ctx.access
        if access.enabled:
            access.record(AccessEntry(
                direction="inbound", source=self.source, destination=self.service.name,
                method=request.method, target=request.target, status=status, duration=elapsed,
                request_id=ids.request_id, subset=self.service.version,
                endpoint=self.endpoint, detail=detail, error=error,
                protocol=f"HTTP/{request.version}", bytes_received=request_bytes,
                bytes_sent=response_bytes, headers=request.headers,
                traceparent=ids.traceparent, grpc_status=grpc))
        tracer = self.ctx.tracer
        if tracer.sample is not None:  # tracing on (a call with these arguments costs ~1 µs)
            tracer.finish(
                SERVER, ids, elapsed, service=self.service.name, peer=self.source,
                destination=self.service.name, method=request.method, target=request.target,
                status=status, subset=self.service.version, endpoint=self.endpoint,
                error=error, detail=detail, grpc_status=grpc_status)

    def count_bad_request(self, exc: ProtocolError) -> None:
        self.ctx.metrics.bad_request("inbound", self.source, self.service.name, exc.status,
                                     mtls=self.caller.authenticated)

    async def _connect(self) -> SocketConnection:
        try:
            return await _connect_app(self.service)
        except ConnectFailed as exc:
            self.ctx.metrics.connection_errors.labels("inbound", exc.reason).inc()
            raise


async def _speaks_tls(transport: SocketConnection) -> bool:
    """Whether the client's first byte starts a TLS handshake record (peeked, not consumed).
    No byte within ``DETECT_TIMEOUT``: plaintext whose server speaks first."""
    with trio.move_on_after(DETECT_TIMEOUT):
        try:
            first = await transport.peek(1)
        except trio.BrokenResourceError:
            return True  # let the TLS path fail and report it
        return not first or first[0] == TLS_HANDSHAKE_RECORD
    return False


async def _connect_app(service: LocalService) -> SocketConnection:
    where = f"{service.address}:{service.port}"
    try:
        with trio.fail_after(APP_CONNECT_TIMEOUT):
            return await connect_tcp(service.address, service.port)
    except trio.TooSlowError:
        raise ConnectFailed("app_connect_timeout", f"connecting to {where} timed out") from None
    except OSError as exc:
        raise ConnectFailed("app_connect_failed",
                            f"cannot connect to {service.name} at {where}: "
                            f"{exc.strerror or exc}") from exc
