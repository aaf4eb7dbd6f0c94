"""The egress proxy listener: what local apps use through ``HTTP_PROXY`` / ``HTTPS_PROXY``.

On hosts without iptables nothing stops an app from dialling out directly; an app pointed at
this listener (``[outbound] egress_port``) gets the mesh's egress policy instead:

* ``http://host/...`` (absolute form): a host that an external destination declares goes
  through that destination exactly as a call to its upstream listener would (routes,
  timeouts, retries, circuit breaker, TLS origination for ``tls = "originate"``: the app
  speaks plain HTTP, meshd speaks TLS); the source label is ``egress``.
* ``CONNECT host:port`` (what clients send for ``https://``): a host:port an external
  destination declares is tunnelled to one of its addresses (the app's own TLS inside,
  counted and logged, the destination's connection limit applied).
* anything else: ``egress = "registered-only"`` (the default) answers 403 with
  ``x-meshd-error: egress-denied`` and a reason naming the host and the mode (a CONNECT before
  any tunnel); ``egress = "allow-any"`` passes it through, counted as ``passthrough``.

Mesh service names are not proxy targets here: a shared listener cannot tell which local
service is calling, so it has no identity to call the mesh with (apps use their upstream
listeners for that). The decisions are ``meshd.proxy.core.egress``; this is their shell.
"""

from __future__ import annotations

import dataclasses
import logging

import trio

from meshd.config.schema import LocalService, Upstream
from meshd.proxy.access import AccessEntry
from meshd.proxy.attempts import ERROR_HEADER, REASON_HEADER, Attempts
from meshd.proxy.core.egress import (
    EGRESS_DENIED_CODE,
    MAX_CONNECT_HEAD,
    EgressKind,
    EgressVerdict,
    absolute_target,
    judge_egress,
    parse_connect,
)
from meshd.proxy.core.http1 import Header, ProtocolError, RequestHead
from meshd.proxy.core.http1_write import simple_response, upstream_request_head
from meshd.proxy.exchange import STREAM_ERRORS, RequestSource
from meshd.proxy.forward import (
    HEAD_TIMEOUT,
    ClientConnection,
    answer_locally,
    discard_body,
    serve_requests,
)
from meshd.proxy.outbound import CLIENT_IDLE_TIMEOUT, TCP_IDLE_TIMEOUT, Outbound, OutboundContext
from meshd.proxy.pool import ConnectFailed
from meshd.proxy.pump import pump
from meshd.proxy.sockio import SocketConnection, connect_tcp
from meshd.registry.model import Endpoint

log = logging.getLogger(__name__)

EGRESS_SOURCE = "egress"  # the source label of what comes through the egress listener
PASSTHROUGH = "passthrough"  # the destination label of what passes undeclared
_CONNECT = b"CONNECT "
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class EgressProxy:
    """The egress listener's connection handler (module doc)."""

    def __init__(self, ctx: OutboundContext) -> None:
        self.ctx = ctx
        self._outbounds: dict[str, Outbound] = {}  # per external destination

    async def handle(self, stream: SocketConnection, conn: ClientConnection) -> None:
        if await _starts_connect(stream):
            await self._tunnel(stream, conn)
        else:
            await serve_requests(stream, conn, self._request, CLIENT_IDLE_TIMEOUT,
                                 on_bad_request=self._count_bad_request)

    # -- http:// ---------------------------------------------------------------------------

    async def _request(self, request: RequestHead, source: RequestSource,
                       conn: ClientConnection) -> bool:
        try:
            host, port, origin = absolute_target(request.target)
        except ProtocolError as exc:
            await discard_body(source, request)
            return await self._refuse(request, source, conn, exc.status, str(exc), "bad-target")
        verdict = judge_egress(self.ctx.view.current.routes, host, port, tunnel=False)
        self._count("http", verdict)
        local = dataclasses.replace(request, target=origin)  # as the destination expects it
        if verdict.kind is EgressKind.EXTERNAL:
            return await self._outbound(verdict.destination).handle_request(local, source, conn)
        if verdict.kind is EgressKind.DENIED:
            log.warning("egress from %s: %s", conn.peer, verdict.reason)
            await discard_body(source, request)
            return await self._refuse(request, source, conn, 403, verdict.reason,
                                      EGRESS_DENIED_CODE)
        return await self._pass(local, source, conn, host, port)

    def _outbound(self, destination: str) -> Outbound:
        handler = self._outbounds.get(destination)
        if handler is None:
            handler = self._outbounds[destination] = Outbound(
                LocalService(EGRESS_SOURCE, 0), Upstream(destination, 0), self.ctx)
        return handler

    async def _pass(self, request: RequestHead, source: RequestSource, conn: ClientConnection,
                    host: str, port: int) -> bool:
        """An undeclared destination under ``allow-any``: one try, as the client asked."""
        started = trio.current_time()
        limit = self.ctx.connect_timeout

        async def connect() -> SocketConnection:
            try:
                with trio.fail_after(limit):
                    return await connect_tcp(host, port)
            except trio.TooSlowError:
                raise ConnectFailed("connect_timeout", f"connecting to {host}:{port} timed "
                                    "out") from None
            except OSError as exc:
                raise ConnectFailed("connect_failed", f"cannot connect to {host}:{port}: "
                                    f"{exc.strerror or exc}") from exc

        head = upstream_request_head(request, forwarded_for=conn.peer, default_host=host)
        attempts = Attempts(request, source, conn, pool=self.ctx.pool,
                            key=(PASSTHROUGH, host, port), connect=connect, upstream_head=head,
                            timeout=None)
        result = await attempts.run()
        self._record(request, PASSTHROUGH, f"{host}:{port}", started, result.status,
                     result.detail, result.code)
        return result.keep

    async def _refuse(self, request: RequestHead, source: RequestSource,
                      conn: ClientConnection, status: int, reason: str, code: str) -> bool:
        started = trio.current_time()
        keep = await answer_locally(source, request, conn, status, reason, _own(code, reason))
        self._record(request, "", "", started, status, reason, code)
        return keep

    # -- CONNECT ---------------------------------------------------------------------------

    async def _tunnel(self, stream: SocketConnection, conn: ClientConnection) -> None:
        """One CONNECT: judged, then a TCP tunnel (or 403/400/502/503 and the end)."""
        started = trio.current_time()
        try:
            head, early = await _connect_head(stream)
            host, port = parse_connect(head)
        except ProtocolError as exc:
            self._count_bad_request(exc)
            await _send(stream, simple_response(exc.status, str(exc), close=True))
            return
        target = f"{host}:{port}".encode("ascii")
        verdict = judge_egress(self.ctx.view.current.routes, host, port, tunnel=True)
        self._count("connect", verdict)
        if not verdict.allowed:
            log.warning("egress CONNECT from %s: %s", conn.peer, verdict.reason)
            await _send(stream, simple_response(403, verdict.reason, close=True,
                                                headers=_own(EGRESS_DENIED_CODE,
                                                             verdict.reason)))
            self._record_tunnel(target, verdict, "", started, 403, verdict.reason)
            return
        state = None
        if verdict.kind is EgressKind.EXTERNAL:
            dest = self.ctx.view.current.routes.get(verdict.destination)
            state = self.ctx.destinations.get(verdict.destination,
                                              dest.policy if dest is not None else None)
            with trio.move_on_after(self.ctx.connect_timeout):
                if not await state.acquire():
                    state = None
            if state is None:
                text = f"external {verdict.destination}: connection limit reached"
                await _send(stream, simple_response(503, text, close=True,
                                                    headers=_own("circuit-open", text)))
                self._record_tunnel(target, verdict, "", started, 503, text)
                return
        try:
            await self._carry(stream, conn, host, port, verdict, early, target, started)
        finally:
            if state is not None:
                state.release()

    async def _carry(self, stream: SocketConnection, conn: ClientConnection, host: str,
                     port: int, verdict: EgressVerdict, early: bytes, target: bytes,
                     started: float) -> None:
        where = self._addresses(verdict, host, port)
        if not where:
            text = f"external {verdict.destination}: {host} has no address (not resolved yet)"
            await _send(stream, simple_response(503, text, close=True,
                                                headers=_own("no-healthy-endpoint", text)))
            self._record_tunnel(target, verdict, "", started, 503, text)
            return
        upstream: trio.abc.HalfCloseableStream | None = None
        failure = ""
        for address in where:  # the first that answers
            try:
                with trio.fail_after(self.ctx.connect_timeout):
                    upstream = await connect_tcp(address, port)
                break
            except (OSError, trio.TooSlowError) as exc:
                failure = f"cannot connect to {address}:{port}: " + (
                    "timed out" if isinstance(exc, trio.TooSlowError)
                    else str(exc.strerror or exc))
        if upstream is None:
            log.warning("egress CONNECT %s from %s: %s", target.decode(), conn.peer, failure)
            await _send(stream, simple_response(502, failure, close=True,
                                                headers=_own("connect-failed", failure)))
            self._record_tunnel(target, verdict, "", started, 502, failure)
            return
        label = verdict.destination or PASSTHROUGH
        m = self.ctx.metrics
        try:
            await stream.send_all(ESTABLISHED)
            if early:  # what the client sent right behind its CONNECT (its ClientHello)
                await upstream.send_all(early)
            m.tcp_connections.labels("egress", EGRESS_SOURCE, label, "").inc()
            self._record_tunnel(target, verdict, f"{where[0]}:{port}", started, 200, "")
            await pump(stream, upstream,
                       count_a_to_b=m.tcp_bytes.labels("egress", label, "sent").inc,
                       count_b_to_a=m.tcp_bytes.labels("egress", label, "received").inc,
                       idle_timeout=TCP_IDLE_TIMEOUT)
        except STREAM_ERRORS:
            pass
        finally:
            await trio.aclose_forcefully(upstream)

    def _addresses(self, verdict: EgressVerdict, host: str, port: int) -> list[str]:
        """Where a tunnel may go: a declared destination's addresses for ``host`` and
        ``port``; the host itself (resolved when connecting) for a passthrough."""
        if verdict.kind is not EgressKind.EXTERNAL:
            return [host]
        found = self.ctx.view.current.endpoint_set(verdict.destination)
        endpoints: tuple[Endpoint, ...] = found.endpoints if found is not None else ()
        return [e.address for e in endpoints if e.node == host and e.port == port]

    # -- counting --------------------------------------------------------------------------

    def _count(self, kind: str, verdict: EgressVerdict) -> None:
        self.ctx.metrics.egress_requests.labels(kind, verdict.kind.value,
                                                verdict.destination).inc()

    def _count_bad_request(self, exc: ProtocolError) -> None:
        self.ctx.metrics.bad_request("egress", EGRESS_SOURCE, "", exc.status, mtls=False)

    def _record(self, request: RequestHead, destination: str, endpoint: str, started: float,
                status: int, detail: str, error: str) -> None:
        """A request meshd answered itself or passed through (one to a declared destination
        is counted and logged as that destination's, by ``Outbound``)."""
        elapsed = trio.current_time() - started
        self.ctx.metrics.request_done("egress", EGRESS_SOURCE, destination, "", status, elapsed,
                                      mtls=False)
        self._log(request.method, request.target, endpoint, status, elapsed, detail, error,
                  destination)

    def _record_tunnel(self, target: bytes, verdict: EgressVerdict, endpoint: str,
                       started: float, status: int, detail: str) -> None:
        destination = verdict.destination or (PASSTHROUGH if verdict.allowed else "")
        self._log(b"CONNECT", target, endpoint, status, trio.current_time() - started, detail,
                  "" if verdict.allowed else EGRESS_DENIED_CODE, destination)

    def _log(self, method: bytes, target: bytes, endpoint: str, status: int, elapsed: float,
             detail: str, error: str, destination: str) -> None:
        access = self.ctx.access
        if access.enabled:
            access.record(AccessEntry(
                direction="egress", source=EGRESS_SOURCE, destination=destination or "-",
                method=method, target=target, status=status, duration=elapsed,
                endpoint=endpoint, detail=detail, error=error))


def _own(code: str, reason: str) -> list[Header]:
    return [(ERROR_HEADER, code.encode("ascii")),
            (REASON_HEADER, reason.encode("ascii", "replace"))]


async def _send(stream: SocketConnection, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except STREAM_ERRORS:
        pass


async def _starts_connect(stream: SocketConnection) -> bool:
    """Whether the client's first request is a CONNECT (peeked at, left in place). A client
    that sends nothing is left to ``serve_requests``' idle timeout."""
    with trio.move_on_after(HEAD_TIMEOUT):
        while True:
            try:
                seen = await stream.peek(len(_CONNECT))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            if not seen or not _CONNECT.startswith(seen):
                return False
            if len(seen) == len(_CONNECT):
                return True
            await trio.sleep(0.01)  # "CONN" so far: look again shortly
    return False


async def _connect_head(stream: SocketConnection) -> tuple[bytes, bytes]:
    """The CONNECT head (to its blank line) and whatever came behind it; within
    ``HEAD_TIMEOUT`` and ``MAX_CONNECT_HEAD`` bytes, else ``ProtocolError``."""
    buffer = b""
    with trio.move_on_after(HEAD_TIMEOUT):
        while (end := buffer.find(b"\r\n\r\n")) < 0 or end > MAX_CONNECT_HEAD:
            if len(buffer) > MAX_CONNECT_HEAD:
                raise ProtocolError("CONNECT head too large", 431)
            try:
                data = await stream.receive_some(MAX_CONNECT_HEAD)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                raise ProtocolError("connection closed in the CONNECT head")
            buffer += data
        head, _, early = buffer.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n", early
    raise ProtocolError(f"CONNECT head not complete within {HEAD_TIMEOUT:g}s", 408)
