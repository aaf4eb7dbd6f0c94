"""Outbound: what a local app's call to ``outbound_address:local_port`` goes through.

One handler per declared upstream. HTTP: each request is routed on its own (weighted split,
then round robin over healthy endpoints) and forwarded over a pooled mTLS connection to the
chosen endpoint's meshd. TCP: one endpoint per connection, bytes pumped both ways.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from meshd.config.schema import LocalService, Protocol, Upstream
from meshd.errors import IdentityError
from meshd.metrics import Metrics
from meshd.proxy.exchange import RequestSource
from meshd.proxy.forward import (
    ClientConnection,
    ConnectFailed,
    answer_locally,
    proxy_request,
    serve_requests,
    upstream_request_head,
)
from meshd.proxy.http1 import ProtocolError, RequestHead
from meshd.proxy.pool import ConnectionPool
from meshd.proxy.pump import pump
from meshd.proxy.router import Decision, RoundRobin, route
from meshd.proxy.streams import TLSStream, open_mtls
from meshd.proxy.tls import HandshakeRefused, TLSState
from meshd.proxy.view import ViewCell
from meshd.registry.model import Endpoint

log = logging.getLogger(__name__)
access_log = logging.getLogger("meshd.access")

CONNECT_TIMEOUT = 5.0  # TCP connect + TLS handshake to a peer meshd
CLIENT_IDLE_TIMEOUT = 120.0  # an app's idle keep-alive connection to its outbound listener


@dataclass
class OutboundContext:
    """What every outbound handler of a host shares."""

    view: ViewCell
    tls: TLSState
    metrics: Metrics
    pool: ConnectionPool
    balancer: RoundRobin = field(default_factory=RoundRobin)
    rand: Callable[[], float] = random.random
    connect_timeout: float = CONNECT_TIMEOUT


class Outbound:
    """The listener-side handler for one (local service, upstream) pair."""

    def __init__(self, service: LocalService, upstream: Upstream, ctx: OutboundContext) -> None:
        self.service = service
        self.upstream = upstream
        self.ctx = ctx
        self.source = service.name
        self.destination = upstream.name

    async def handle(self, stream: trio.SocketStream, conn: ClientConnection) -> None:
        if self.upstream.protocol is Protocol.TCP:
            await self._handle_tcp(stream, conn)
        else:
            await serve_requests(stream, conn, self._handle_request, CLIENT_IDLE_TIMEOUT,
                                 on_bad_request=self._count_bad_request)

    # -- HTTP ----------------------------------------------------------------------------------

    async def _handle_request(self, request: RequestHead, source: RequestSource,
                              conn: ClientConnection) -> bool:
        ctx = self.ctx
        started = trio.current_time()
        decision = route(ctx.view.current, self.destination, ctx.rand(), ctx.balancer)
        endpoint = decision.endpoint
        if endpoint is None:
            log.warning("%s -> %s: %s", self.source, self.destination, decision.reason)
            keep = await answer_locally(
                source.stream, source, request, conn, 503, decision.reason,
                [(b"x-meshd-reason", decision.reason.encode("ascii", "replace"))])
            self._record(request, decision, 503, started, decision.reason)
            return keep
        head = upstream_request_head(request, forwarded_for=conn.peer,
                                     default_host=self.destination)
        result = await proxy_request(
            request, source, source.stream, conn, pool=ctx.pool,
            key=(self.source, endpoint.service, endpoint.address, endpoint.port),
            connect=lambda: self._connect(endpoint), upstream_head=head,
            request_timeout=decision.timeout)
        self._record(request, decision, result.status, started, result.detail)
        if result.detail and result.status >= 500:
            log.warning("%s -> %s (%s): %d %s", self.source, self.destination,
                        endpoint.key, result.status, result.detail)
        return result.keep

    def _record(self, request: RequestHead, decision: Decision, status: int, started: float,
                detail: str) -> None:
        m = self.ctx.metrics
        subset = decision.subset_label
        m.requests.labels("outbound", self.source, self.destination, subset, str(status)).inc()
        elapsed = trio.current_time() - started
        m.request_duration.labels("outbound", self.destination, subset).observe(elapsed)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("outbound %s -> %s subset=%s endpoint=%s %s %s %d %.1fms%s",
                            self.source, self.destination, subset or "-",
                            decision.endpoint.key if decision.endpoint else "-",
                            request.method.decode("ascii", "replace"),
                            request.target.decode("ascii", "replace")[:200], status,
                            elapsed * 1000, f" ({detail})" if detail else "")

    def _count_bad_request(self, exc: ProtocolError) -> None:
        self.ctx.metrics.requests.labels("outbound", self.source, self.destination, "",
                                         str(exc.status)).inc()

    async def _connect(self, endpoint: Endpoint) -> TLSStream:
        """A new mTLS connection to ``endpoint`` as our service; raises ``ConnectFailed``."""
        where = f"{endpoint.address}:{endpoint.port}"
        try:
            with trio.fail_after(self.ctx.connect_timeout):
                return await open_mtls(endpoint.address, endpoint.port, self.ctx.tls,
                                       self.source, self.destination)
        except trio.TooSlowError:
            failure = ConnectFailed("connect_timeout", f"connecting to {where} timed out")
        except OSError as exc:
            failure = ConnectFailed("connect_failed",
                                    f"cannot connect to {where}: {exc.strerror or exc}")
        except HandshakeRefused as exc:
            failure = ConnectFailed(exc.reason, f"mTLS to {where} refused: {exc}")
        except IdentityError as exc:
            failure = ConnectFailed("no_identity", str(exc))
        self.ctx.metrics.connection_errors.labels("outbound", failure.reason).inc()
        raise failure

    # -- TCP -----------------------------------------------------------------------------------

    async def _handle_tcp(self, stream: trio.SocketStream, conn: ClientConnection) -> None:
        ctx = self.ctx
        decision = route(ctx.view.current, self.destination, ctx.rand(), ctx.balancer)
        if decision.endpoint is None:
            log.warning("%s -> %s (tcp) from %s: %s; closing", self.source, self.destination,
                        conn.peer, decision.reason)
            ctx.metrics.connection_errors.labels("outbound", "no_healthy_endpoint").inc()
            return
        try:
            upstream = await self._connect(decision.endpoint)
        except ConnectFailed as exc:
            log.warning("%s -> %s (tcp): %s; closing", self.source, self.destination, exc)
            return
        subset = decision.subset_label
        ctx.metrics.tcp_connections.labels("outbound", self.source, self.destination,
                                           subset).inc()
        sent = ctx.metrics.tcp_bytes.labels("outbound", self.destination, "sent")
        received = ctx.metrics.tcp_bytes.labels("outbound", self.destination, "received")
        try:
            await pump(stream, upstream, count_a_to_b=sent.inc, count_b_to_a=received.inc)
        finally:
            await trio.aclose_forcefully(upstream)
