"""An ingress gateway's listeners: outside clients into the mesh.

Each ``[[gateways.listeners]]`` entry is a listener of the proxy with this handler:

* ``http``: HTTP/1.1 (and h2c with prior knowledge), each request routed by its host and path
  (``config.gateway.route_for``) to a mesh service; or, with ``redirect_https``, every request
  answered ``308`` to the same URL over https;
* ``https``: TLS terminated here with the operator's certificate for the name the client asks
  for (SNI; the first certificate for a client that names none or another), then HTTP/2 or
  HTTP/1.1 by ALPN, routed as above;
* ``tls``: TLS passed through: the ClientHello's server name picks the route, and the bytes
  (handshake included) are carried to a TCP service, whose app terminates the client's TLS.

A routed request goes where a local app's call to that service would go: the outbound handler
of the service (``meshd.proxy.outbound.Outbound``), with the gateway as the calling service, so
the route table, policies, retries, metrics and access logs are the mesh's own, and the callee
sees the gateway's SPIFFE identity (its authorization can allow it by name). ``X-Forwarded-Proto``
says how the client came in (one sent by the client is replaced), and ``X-Forwarded-For`` gets
the client's address, as at any hop.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl

import trio

from meshd.config.gateway import (
    Gateway,
    GatewayListener,
    host_matches,
    request_host,
    route_for,
)
from meshd.config.schema import LocalService, Protocol, Upstream
from meshd.identity.tls import ALPN_H2, classify_tls_failure
from meshd.proxy.core import sni
from meshd.proxy.core.attempt import ERROR_HEADER, REASON_HEADER
from meshd.proxy.core.http1 import Header, ProtocolError, RequestHead
from meshd.proxy.exchange import RequestSource
from meshd.proxy.forward import ClientConnection, answer_locally, discard_body, serve_http
from meshd.proxy.h2conn import H2Request, starts_h2
from meshd.proxy.outbound import CLIENT_IDLE_TIMEOUT, Outbound, OutboundContext
from meshd.proxy.sockio import SocketConnection
from meshd.proxy.streams import TLSStream

log = logging.getLogger(__name__)

NO_ROUTE = "no-route"
FORWARDED_PROTO = b"x-forwarded-proto"
HELLO_TIMEOUT = 10.0  # from accept to a whole ClientHello (passthrough) or handshake (https)


def server_context(listener: GatewayListener) -> ssl.SSLContext:
    """The TLS context of an https listener: its first certificate by default, another one
    picked by SNI (``hosts`` of each certificate), TLS 1.2 and up, ALPN h2 and http/1.1."""
    contexts = []
    for cert in listener.certificates:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
        ctx.set_alpn_protocols([ALPN_H2, "http/1.1"])
        contexts.append((cert.hosts, ctx))
    default = contexts[0][1]

    def pick(sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
             _ctx: ssl.SSLContext) -> None:
        name = (server_name or "").lower()
        for hosts, ctx in contexts:
            if any(host_matches(pattern, name) for pattern in hosts):
                sslobj.context = ctx
                return
        # no match: the default certificate; the client decides whether it will do

    default.sni_callback = pick
    return default


class GatewayHandler:
    """The handler of one gateway listener (the module doc)."""

    def __init__(self, gateway: Gateway, listener: GatewayListener,
                 ctx: OutboundContext) -> None:
        self.gateway = gateway
        self.listener = listener
        self.ctx = ctx
        self.identity = LocalService(gateway.name, 0)  # the calling service: the gateway
        self._outbound: dict[tuple[str, Protocol], Outbound] = {}
        self._tls = server_context(listener) if listener.protocol == "https" else None
        self.scheme = b"https" if listener.protocol == "https" else b"http"

    def outbound(self, service: str, protocol: Protocol = Protocol.HTTP) -> Outbound:
        key = (service, protocol)
        handler = self._outbound.get(key)
        if handler is None:
            handler = self._outbound[key] = Outbound(self.identity, Upstream(service, 0, protocol),
                                                     self.ctx)
        return handler

    async def handle(self, stream: SocketConnection, conn: ClientConnection) -> None:
        if self.listener.protocol == "tls":
            await self._pass_through(stream, conn)
        elif self._tls is not None:
            await self._terminate(stream, conn)
        else:
            await serve_http(stream, conn, self.handle_request, CLIENT_IDLE_TIMEOUT,
                             h2=await starts_h2(stream), on_bad_request=self._count_bad_request)

    # -- HTTP and HTTPS ------------------------------------------------------------------------

    async def _terminate(self, transport: SocketConnection, conn: ClientConnection) -> None:
        assert self._tls is not None
        stream = TLSStream(transport, self._tls, server_side=True)
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                await stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError) as exc:
            reason = ("handshake_timeout" if isinstance(exc, trio.TooSlowError)
                      else classify_tls_failure(exc)[0])
            log.info("gateway %s: TLS handshake from %s failed (%s)", self.gateway.name,
                     conn.peer, reason)
            self.ctx.metrics.connection_errors.labels("gateway", reason).inc()
            await trio.aclose_forcefully(stream)
            return
        try:
            h2 = stream.ssl_object.selected_alpn_protocol() == ALPN_H2
            await serve_http(stream, conn, self.handle_request, CLIENT_IDLE_TIMEOUT, h2=h2,
                             on_bad_request=self._count_bad_request)
        finally:
            await trio.aclose_forcefully(stream)

    async def handle_request(self, request: RequestHead, source: RequestSource | H2Request,
                             conn: ClientConnection) -> bool:
        host = request_host(_host_of(request.headers))
        if self.listener.redirect_https is not None:
            return await self._redirect(request, source, conn, host)
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        route = route_for(self.gateway.routes, host, path)
        if route is None:
            text = f"gateway {self.gateway.name}: no route for host {host!r} and path {path!r}"
            self.ctx.metrics.bad_request("gateway", self.gateway.name, "", 404, mtls=False)
            await discard_body(source, request)
            return await answer_locally(source, request, conn, 404, text,
                                        [(ERROR_HEADER, NO_ROUTE.encode("ascii")),
                                         (REASON_HEADER, text.encode("ascii", "replace"))])
        headers = tuple(h for h in request.headers if h[0].lower() != FORWARDED_PROTO)
        request = dataclasses.replace(request, headers=(*headers, (FORWARDED_PROTO, self.scheme)))
        return await self.outbound(route.service).handle_request(request, source, conn)

    async def _redirect(self, request: RequestHead, source: RequestSource | H2Request,
                        conn: ClientConnection, host: str) -> bool:
        port = self.listener.redirect_https
        where = host if port == 443 else f"{host}:{port}"
        location = b"https://" + where.encode("idna") + request.target
        await discard_body(source, request)
        text = f"moved to https: {location.decode('ascii', 'replace')}"
        self.ctx.metrics.bad_request("gateway", self.gateway.name, "", 308, mtls=False)
        return await answer_locally(source, request, conn, 308, text,
                                    [(b"location", location)])

    def _count_bad_request(self, exc: ProtocolError) -> None:
        self.ctx.metrics.bad_request("gateway", self.gateway.name, "", exc.status, mtls=False)

    # -- TLS passthrough -----------------------------------------------------------------------

    async def _pass_through(self, stream: SocketConnection, conn: ClientConnection) -> None:
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                name = await _peek_server_name(stream)
        except (trio.TooSlowError, sni.NotTLS, trio.BrokenResourceError) as exc:
            reason = "handshake_timeout" if isinstance(exc, trio.TooSlowError) else "not_tls"
            log.info("gateway %s: passthrough connection from %s closed: %s", self.gateway.name,
                     conn.peer, exc or reason)
            self.ctx.metrics.connection_errors.labels("gateway", reason).inc()
            return
        route = route_for(self.gateway.routes, name, "/")
        if route is None:
            log.info("gateway %s: no route for TLS server name %r from %s: closed",
                     self.gateway.name, name, conn.peer)
            self.ctx.metrics.connection_errors.labels("gateway", "no_route").inc()
            return
        await self.outbound(route.service, Protocol.TCP).handle(stream, conn)


async def _peek_server_name(stream: SocketConnection) -> str:
    """The SNI of the client's ClientHello, peeked (the bytes stay for the service)."""
    size = 1024
    while True:
        data = await stream.peek(size)
        if not data:
            raise sni.NotTLS("the client closed the connection")
        name = sni.client_hello_sni(data)
        if name is not None:
            return name
        if len(data) >= size:
            size = min(size * 4, sni.MAX_HELLO + 5 * 8)
        else:
            await trio.sleep(0.01)  # the rest of the ClientHello is on its way


def _host_of(headers: tuple[Header, ...]) -> str:
    value = next((v for n, v in headers if n.lower() == b"host"), b"")
    return value.decode("ascii", "replace")

