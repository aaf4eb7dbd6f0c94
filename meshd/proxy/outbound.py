"""Outbound: what a local app's call to ``outbound_address:local_port`` goes through.

One handler per declared upstream. HTTP: each request is routed on its own — the first
matching route of the destination, its edge features (rate limit, redirect, header edits,
rewrites: ``core.edge``), fault injection, a subset by weighted split, an endpoint by
the destination's balancer among those not ejected — and sent over a pooled mTLS connection to
that endpoint's meshd, with the route's timeouts and retries (``meshd.proxy.attempts``, the
forwarding path inbound takes too); a copy may go to a mirror subset afterwards. TCP: the
default route's split, one endpoint per connection, bytes pumped both ways.

Every request leaves with an ``X-Request-Id`` (kept, or made) and a ``traceparent`` of this hop
(``meshd.proxy.core.trace``); the destination's ``policy.max_request_bytes`` bounds its body (413).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from meshd.config.schema import ExternalService, LocalService, Protocol, Route, Upstream
from meshd.errors import IdentityError
from meshd.identity.tls import HandshakeRefused, TLSState
from meshd.metrics import Metrics
from meshd.proxy.access import AccessEntry, AccessLog
from meshd.proxy.attempts import ERROR_HEADER, REASON_HEADER, Attempts, Destination
from meshd.proxy.core.attempt import FAULT_CODE, LOCAL_CONNECT_FAILURES, NO_ENDPOINT_CODE
from meshd.proxy.core.edge import RATE_LIMITED_CODE, LocalAnswer, apply_route_edits
from meshd.proxy.core.fault import decide_fault, mirrored
from meshd.proxy.core.grpc import (
    GRPC_TIMEOUT,
    effective_timeout,
    format_grpc_timeout,
    grpc_request,
    parse_grpc_timeout,
    status_for_meshd_error,
)
from meshd.proxy.core.h2 import request_fields, wants_trailers
from meshd.proxy.core.http1 import Header, ProtocolError, RequestHead
from meshd.proxy.core.http1_write import upstream_request_fields, upstream_request_head
from meshd.proxy.core.matcher import RequestFacts
from meshd.proxy.core.outlier import CONNECTED, Failure
from meshd.proxy.core.ratelimit import RateLimits
from meshd.proxy.core.retry import REPLAY_LIMIT, Body, retry_verdict, route_retries
from meshd.proxy.core.router import RoutePlan, Tier, candidates, no_endpoint_reason, plan
from meshd.proxy.core.trace import RequestIdentity, identify
from meshd.proxy.core.view import MeshView, ViewCell
from meshd.proxy.destinations import Destinations, DestinationState
from meshd.proxy.exchange import RequestSource
from meshd.proxy.external import ExternalConnector
from meshd.proxy.forward import (
    ClientConnection,
    answer_locally,
    discard_body,
    refuse_large_body,
    serve_http,
)
from meshd.proxy.h2conn import H2Pool, H2Request, starts_h2
from meshd.proxy.mirror import MIRROR_HEADER, MIRROR_TIMEOUT, Mirror, MirrorJob
from meshd.proxy.pool import ConnectFailed, ConnectionPool
from meshd.proxy.pump import pump
from meshd.proxy.replay import ReplayBody
from meshd.proxy.sockio import SocketConnection
from meshd.proxy.streams import TLSStream, open_mtls
from meshd.registry.model import Endpoint
from meshd.tracing.spans import CLIENT
from meshd.tracing.tracer import Tracer

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # TCP connect + TLS handshake to a peer meshd
# An opaque TCP connection carrying no byte either way for this long is closed (Envoy's tcp_proxy
# default); ``policy.idle_timeout`` sets it per destination.
TCP_IDLE_TIMEOUT = 3600.0
CLIENT_IDLE_TIMEOUT = 120.0  # an app's idle keep-alive connection to its outbound listener


@dataclass
class OutboundContext:
    """What every outbound handler of a host shares."""

    view: ViewCell
    tls: TLSState
    metrics: Metrics
    pool: ConnectionPool
    h2_pool: H2Pool
    rand: Callable[[], float] = random.random
    connect_timeout: float = CONNECT_TIMEOUT
    here: tuple[tuple[str, str], ...] = ()  # this host's labels, for locality priority
    access: AccessLog = field(default_factory=AccessLog)
    rate_limits: RateLimits = field(default_factory=RateLimits)  # the routes' token buckets
    tracer: Tracer = field(default_factory=Tracer.off)
    destinations: Destinations = field(init=False)
    mirror: Mirror = field(init=False)
    external: ExternalConnector = field(init=False)

    def __post_init__(self) -> None:
        self.destinations = Destinations(self.metrics)
        self.external = ExternalConnector(self.metrics)
        self.mirror = Mirror(self.metrics, self.pool)

    def endpoint_states(self, now: float) -> dict[str, list[dict[str, Any]]]:
        """Per destination in the view, each endpoint's ejection state and requests in flight
        (``node`` and ``instance_id`` identify it, as in ``/v1/state``)."""
        view = self.view.current
        out: dict[str, list[dict[str, Any]]] = {}
        for name, endpoints in sorted(view.all_endpoints().items()):
            state = self.destinations.known(name)
            rows = []
            for e in endpoints.endpoints:
                row: dict[str, Any] = {"node": e.node, "instance_id": e.instance_id}
                if state is not None:
                    row.update(state.endpoint_state(e, now))
                else:
                    row.update(ejected=False, ejection_remaining_seconds=0.0, ejections=0,
                               ejection_reason="", active_requests=0)
                rows.append(row)
            out[name] = rows
        return out


class Outbound:
    """The listener-side handler for one (local service, upstream) pair."""

    def __init__(self, service: LocalService, upstream: Upstream, ctx: OutboundContext) -> None:
        self.service = service
        self.upstream = upstream
        self.ctx = ctx
        self.source = service.name
        self.destination = upstream.name

    async def handle(self, stream: SocketConnection, conn: ClientConnection) -> None:
        if self.upstream.protocol is Protocol.TCP:
            await self._handle_tcp(stream, conn)
        else:  # HTTP/1.1, or h2c with prior knowledge (gRPC clients' http://) on one port
            await serve_http(stream, conn, self.handle_request, CLIENT_IDLE_TIMEOUT,
                             h2=await starts_h2(stream), on_bad_request=self._count_bad_request)

    # -- HTTP ----------------------------------------------------------------------------------

    async def handle_request(self, request: RequestHead, source: RequestSource | H2Request,
                              conn: ClientConnection) -> bool:
        ctx = self.ctx
        started = trio.current_time()
        view = ctx.view.current  # read once: a reload never changes the rules mid-request
        dest = view.routes.get(self.destination)
        facts = RequestFacts.from_head(request.method, request.target, request.headers,
                                       conn.peer)
        ids = identify(request.headers, sample=ctx.tracer.sample)
        routed = plan(view, self.destination, facts, ctx.rand(), ctx.here)
        route = routed.route
        # the route's edge features: rate limit, redirect (answered here), header edits, rewrite
        edge = apply_route_edits(route, request, limits=ctx.rate_limits,
                                 destination=self.destination, source=self.source,
                                 now=started, default_host=self.destination)
        if edge is not None:
            if edge.answer is not None:
                return await self._answer_edge(edge.answer, request, source, conn, routed,
                                               started, ids)
            request = edge.request
        fault = decide_fault(route.fault if route is not None else None, ctx.rand)
        if not fault.none:
            answered = await self._inject(fault.delay, fault.abort_status, request, source,
                                          conn, routed, started, ids)
            if answered is not None:
                return answered
        if not routed.candidates:
            reason = no_endpoint_reason(view, self.destination, routed.subset)
            log.warning("%s -> %s: %s", self.source, self.destination, reason)
            await discard_body(source, request)
            keep = await answer_locally(source, request, conn, 503, reason,
                                        [(ERROR_HEADER, NO_ENDPOINT_CODE.encode("ascii")),
                                         (REASON_HEADER, reason.encode("ascii", "replace"))])
            self._record(request, routed, started, ids, status=503, detail=reason,
                         error=NO_ENDPOINT_CODE)
            return keep
        limit = dest.policy.max_request_bytes if dest is not None else None
        refused = await refuse_large_body(source, request, conn, limit)
        if refused is not None:
            self._record(request, routed, started, ids, status=413,
                         detail="request body too large")
            return refused
        state = ctx.destinations.get(self.destination, dest.policy if dest else None)
        mirror = self._mirror_subset(route)
        # kept for retries: a route's own, or (none declared) those of a request that never
        # reached an app, which any method gets
        retries = route_retries(route.retries if route is not None else None)
        keep_body = retries.attempts > 0 or mirror is not None
        body = ReplayBody(source, request, REPLAY_LIMIT) if keep_body else None
        external = dest.external if dest is not None else None
        # the mesh hop speaks what the app spoke (HTTP/2: ALPN h2); an external one HTTP/1.1
        h2 = isinstance(source, H2Request) and external is None
        grpc = h2 and source.grpc  # type: ignore[union-attr]
        timeout = routed.timeout
        fields: list[Header] | None = None
        if h2:
            head = b""
            fields = self._h2_fields(request, conn, ids)
            if grpc:
                timeout = self._grpc_deadline(request, fields, timeout)
        elif external is not None:  # its own name in Host, not the listener's address
            head = upstream_request_head(request, forwarded_for=conn.peer,
                                         default_host=external.authority, drop=(b"host",),
                                         ids=ids)
        else:
            head = upstream_request_head(request, forwarded_for=conn.peer,
                                         default_host=self.destination, ids=ids)
        destination = Destination(
            plan=routed, state=state, endpoints=view.endpoint_set(self.destination),
            pool_key=self._pool_key, connect=self._connector(state, h2=h2, external=external),
            rand=ctx.rand, metrics=ctx.metrics, hash_key=self._hash_key(state, facts, conn))
        attempts = Attempts(request, source, conn, pool=ctx.pool, upstream_head=head,
                            timeout=timeout, destination=destination, body=body,
                            h2_pool=ctx.h2_pool if h2 else None, upstream_fields=fields,
                            grpc=grpc,
                            edit_response=edge.response if edge is not None else None)
        result = await attempts.run()
        endpoint = attempts.endpoint
        tier = attempts.tier
        if tier is not None and tier.failover:
            ctx.metrics.failovers.labels(self.destination, routed.subset or "",
                                         tier.subset or "").inc()
        self._record(request, routed, started, ids, status=result.status, detail=result.detail,
                     endpoint=endpoint, tries=attempts.tries, error=result.code,
                     served_by=tier.subset if tier is not None else None,
                     request_bytes=result.request_bytes, response_bytes=result.response_bytes,
                     delayed=fault.delay is not None, grpc_status=result.grpc_status)
        if result.detail and result.status >= 500:
            log.warning("%s -> %s (%s): %d %s", self.source, self.destination,
                        endpoint.key if endpoint else "-", result.status, result.detail)
        if mirror is not None:
            self._send_mirror(view, state, mirror, route, request, conn, body, facts, ids)
        return result.keep

    def _h2_fields(self, request: RequestHead, conn: ClientConnection,
                   ids: RequestIdentity) -> list[Header]:
        fields = upstream_request_fields(request, forwarded_for=conn.peer,
                                         default_host=self.destination, ids=ids)
        return request_fields(request.method, request.target, fields,
                              trailers=wants_trailers(request.headers),
                              length=request.content_length)

    @staticmethod
    def _grpc_deadline(request: RequestHead, fields: list[Header],
                       route_timeout: float | None) -> float | None:
        """A gRPC call's deadline: its ``grpc-timeout``, capped by the route's timeout (then
        the server is told the capped one)."""
        asked = parse_grpc_timeout(next((v for n, v in request.headers if n == GRPC_TIMEOUT),
                                        None))
        deadline = effective_timeout(route_timeout, asked)
        if deadline is not None and deadline != asked:
            fields[:] = [f for f in fields if f[0] != GRPC_TIMEOUT]
            fields.append((GRPC_TIMEOUT, format_grpc_timeout(deadline)))
        return deadline

    async def _inject(self, delay: float | None, abort: int | None, request: RequestHead,
                      source: RequestSource | H2Request, conn: ClientConnection, routed: RoutePlan,
                      started: float, ids: RequestIdentity) -> bool | None:
        """Apply an injected fault; returns whether the connection may stay open when the
        request was answered (aborted), None when it goes on to the destination."""
        m = self.ctx.metrics
        if delay is not None:
            m.faults_injected.labels(self.destination, routed.route_name, "delay").inc()
            await trio.sleep(delay)
        if abort is None:
            return None
        m.faults_injected.labels(self.destination, routed.route_name, "abort").inc()
        text = f"fault injected by route {routed.route_name}"
        keep = await answer_locally(source, request, conn, abort, text,
                                    [(ERROR_HEADER, FAULT_CODE.encode("ascii")),
                                     (REASON_HEADER, text.encode("ascii", "replace"))])
        self._record(request, routed, started, ids, status=abort, detail=text,
                     error=FAULT_CODE, delayed=delay is not None)
        return keep

    async def _answer_edge(self, answer: LocalAnswer, request: RequestHead,
                           source: RequestSource | H2Request, conn: ClientConnection,
                           routed: RoutePlan, started: float, ids: RequestIdentity) -> bool:
        """Answer what a route's edge features answer themselves (a 429 over its rate limit,
        a redirect); returns whether the connection may stay open."""
        if answer.code == RATE_LIMITED_CODE:
            self.ctx.metrics.rate_limited.labels(self.destination, routed.route_name).inc()
        await discard_body(source, request)
        keep = await answer_locally(source, request, conn, answer.status, answer.text,
                                    list(answer.headers))
        self._record(request, routed, started, ids, status=answer.status, detail=answer.text,
                     error=answer.code)
        return keep

    def _hash_key(self, state: DestinationState, facts: RequestFacts,
                  conn: ClientConnection) -> str | None:
        hash_on = state.policy.hash_on
        if hash_on is None:
            return None
        if hash_on.source:
            return conn.peer
        assert hash_on.header is not None
        return facts.header(hash_on.header)

    def _pool_key(self, endpoint: Endpoint) -> tuple[str, str, str, str, int]:
        # the node: an external endpoint's TLS name (one address may serve several names)
        return (self.source, endpoint.service, endpoint.node, endpoint.address, endpoint.port)

    # -- mirroring -----------------------------------------------------------------------------

    def _mirror_subset(self, route: Route | None) -> str | None:
        if route is None or route.mirror is None:
            return None
        return route.mirror.subset if mirrored(route.mirror.percent, self.ctx.rand()) else None

    def _send_mirror(self, view: MeshView, state: DestinationState, subset: str,
                     route: Route | None, request: RequestHead, conn: ClientConnection,
                     body: ReplayBody | None, facts: RequestFacts,
                     ids: RequestIdentity) -> None:
        ctx = self.ctx
        content = body.complete() if body is not None else None
        if content is None:
            ctx.mirror.skip(self.destination, subset, "body_not_kept")
            return
        found = candidates(view, self.destination, subset)
        picked = state.pick((Tier(subset, 0, found),) if found else (), trio.current_time(),
                            ctx.rand, self._hash_key(state, facts, conn))
        if picked is None:
            ctx.mirror.skip(self.destination, subset, "no_endpoint")
            return
        endpoint = picked[0]
        head = upstream_request_head(request, forwarded_for=conn.peer,
                                     default_host=self.destination, drop=(MIRROR_HEADER[0],),
                                     extra=(MIRROR_HEADER,), ids=ids)
        timeout = route.timeout if route is not None and route.timeout else MIRROR_TIMEOUT
        connect = self._connector(state)
        ctx.mirror.submit(MirrorJob(
            destination=self.destination, subset=subset, endpoint=endpoint, request=request,
            head=head, body=content, pool_key=self._pool_key(endpoint),
            connect=lambda: connect(endpoint), timeout=timeout))

    def _record(self, request: RequestHead, routed: RoutePlan, started: float,
                ids: RequestIdentity, *, status: int, detail: str,
                endpoint: Endpoint | None = None, tries: int = 0, error: str = "",
                served_by: str | None = None, request_bytes: int = 0, response_bytes: int = 0,
                delayed: bool = False, grpc_status: int | None = None) -> None:
        """Metrics and the access log line of one request; ``served_by``: the subset of the
        tier the last try went to (a failover subset, or the one drawn); ``grpc_status``: a
        gRPC call's outcome (meshd's own answer to one is a gRPC status too)."""
        if grpc_status is None and error and grpc_request(request.headers):
            grpc_status = int(status_for_meshd_error(status, error))
        grpc = "" if grpc_status is None else str(grpc_status)
        m = self.ctx.metrics
        drawn = routed.subset or ""
        subset = served_by if served_by is not None else drawn
        elapsed = trio.current_time() - started
        m.request_done("outbound", self.source, self.destination, subset, status, elapsed,
                       request_bytes=request_bytes, response_bytes=response_bytes,
                       grpc_status=grpc)
        access = self.ctx.access
        if access.enabled:
            access.record(AccessEntry(
                direction="outbound", source=self.source, destination=self.destination,
                method=request.method, target=request.target, status=status, duration=elapsed,
                request_id=ids.request_id, route=routed.route_name, subset=subset,
                endpoint=endpoint.key if endpoint is not None else "", detail=detail,
                tries=tries, error=error, failover_from=drawn if subset != drawn else "",
                protocol=f"HTTP/{request.version}", bytes_received=request_bytes,
                bytes_sent=response_bytes, fault_delayed=delayed, headers=request.headers,
                traceparent=ids.traceparent, grpc_status=grpc))
        tracer = self.ctx.tracer
        if tracer.sample is not None:  # tracing on (a call with these arguments costs ~1 µs)
            tracer.finish(
                CLIENT, ids, elapsed, service=self.source, peer=self.destination,
                destination=self.destination, method=request.method, target=request.target,
                status=status, subset=subset, route=routed.route_name,
                endpoint=endpoint.key if endpoint is not None else "", tries=tries,
                error=error, detail=detail, grpc_status=grpc_status)

    def _count_bad_request(self, exc: ProtocolError) -> None:
        self.ctx.metrics.bad_request("outbound", self.source, self.destination, exc.status)

    def _connector(self, state: DestinationState, *, h2: bool = False,
                   external: ExternalService | None = None
                   ) -> Callable[[Endpoint], Awaitable[trio.abc.HalfCloseableStream]]:
        """Connecting with the destination policy's ``connect_timeout`` (as read by the
        request at its start), else the host's; ``h2``: speaking HTTP/2; ``external``: to a
        destination outside the mesh (``meshd.proxy.external``), not over mTLS."""
        limit = state.policy.connect_timeout or self.ctx.connect_timeout
        if external is not None:
            connector, name = self.ctx.external, self.destination
            return lambda endpoint: connector.connect(name, external, endpoint, limit)
        return lambda endpoint: self._connect(endpoint, limit, h2)

    async def _connect(self, endpoint: Endpoint, limit: float, h2: bool = False) -> TLSStream:
        """A new mTLS connection to ``endpoint`` as our service; raises ``ConnectFailed``."""
        where = f"{endpoint.address}:{endpoint.port}"
        try:
            with trio.fail_after(limit):
                return await open_mtls(endpoint.address, endpoint.port, self.ctx.tls,
                                       self.source, self.destination, h2=h2)
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

    async def _handle_tcp(self, stream: SocketConnection, conn: ClientConnection) -> None:
        """The default route's split, one endpoint for the connection (connect failures
        retried on another one: the default route's retries on connect-failure, or without
        declared retries up to two other endpoints)."""
        ctx = self.ctx
        view = ctx.view.current
        dest = view.routes.get(self.destination)
        routed = plan(view, self.destination, None, ctx.rand(), ctx.here)
        if not routed.candidates:
            reason = no_endpoint_reason(view, self.destination, routed.subset)
            log.warning("%s -> %s (tcp) from %s: %s; closing", self.source, self.destination,
                        conn.peer, reason)
            ctx.metrics.connection_errors.labels("outbound", "no_healthy_endpoint").inc()
            return
        state = ctx.destinations.get(self.destination, dest.policy if dest else None)
        with trio.move_on_after(ctx.connect_timeout) as waited:
            admitted = await state.acquire()
        if waited.cancelled_caught or not admitted:
            log.warning("%s -> %s (tcp) from %s: %s; closing", self.source, self.destination,
                        conn.peer, state.rejection_reason())
            return
        try:
            connected = await self._connect_tcp(routed, state, conn, view)
            if connected is None:
                return
            endpoint, upstream = connected
            subset = routed.subset or ""
            ctx.metrics.tcp_connections.labels("outbound", self.source, self.destination,
                                               subset).inc()
            sent = ctx.metrics.tcp_bytes.labels("outbound", self.destination, "sent")
            received = ctx.metrics.tcp_bytes.labels("outbound", self.destination, "received")
            state.begin(endpoint)
            try:
                await pump(stream, upstream, count_a_to_b=sent.inc, count_b_to_a=received.inc,
                           idle_timeout=state.policy.idle_timeout or TCP_IDLE_TIMEOUT)
            finally:
                state.end(endpoint)
                await trio.aclose_forcefully(upstream)
        finally:
            state.release()

    async def _connect_tcp(self, routed: RoutePlan, state: DestinationState,
                           conn: ClientConnection, view: MeshView
                           ) -> tuple[Endpoint, trio.abc.HalfCloseableStream] | None:
        ctx = self.ctx
        retries = route_retries(routed.route.retries if routed.route is not None else None)
        hash_key = conn.peer if state.policy.hash_on is not None else None
        tried: list[str] = []
        dest = view.routes.get(self.destination)
        connect = self._connector(state, external=dest.external if dest is not None else None)
        while True:
            now = trio.current_time()
            picked = state.pick(routed.tiers, now, ctx.rand, hash_key, tried)
            assert picked is not None
            endpoint = picked[0]
            try:
                upstream = await connect(endpoint)
            except ConnectFailed as exc:
                log.warning("%s -> %s (tcp): %s", self.source, self.destination, exc)
                if exc.reason in LOCAL_CONNECT_FAILURES:
                    return None
                now = trio.current_time()
                state.record(endpoint, Failure.CONNECT, now,
                             view.endpoint_set(self.destination))
                fresh = state.fresh_left(routed.tiers, now, (*tried, endpoint.key))
                verdict = retry_verdict(retries, len(tried), Failure.CONNECT, "", Body.NONE,
                                        fresh=fresh)
                if not verdict.retry or not state.budget.try_spend(now):
                    return None
                ctx.metrics.retries.labels(self.destination, Failure.CONNECT.value).inc()
                tried.append(endpoint.key)
                continue
            state.record(endpoint, CONNECTED, trio.current_time(),
                         view.endpoint_set(self.destination))
            return endpoint, upstream
