"""The data plane of one host: every listener, the connection pools, drain.

    Proxy.run
      ├─ pool reapers            (mesh connections: 30 s idle; app connections: 4 s)
      ├─ HTTP/2 pools            (their connections' readers, and the same idle reaping)
      ├─ mirror workers          (copies of mirrored requests, from a bounded queue)
      ├─ external resolver       (external destinations' endpoints: their names looked up)
      └─ connections nursery     (one task per accepted connection, while it is busy)
           └─ listeners          (inbound mTLS listener; one outbound listener per upstream;
                │                 the egress proxy listener, ``meshd.proxy.egress``)
                ├─ accept loops
                └─ keep-alive rooms (idle HTTP/1.1 connections between requests, no task)

``run`` binds every listener first (a port in use is a ``ProxyError`` naming the address), or
adopts the socket inherited for its address (``meshd.listen_fds``: a restart or an upgrade), and
reports started only once all of them accept. A reload adds and removes outbound listeners
while the others serve (``add_outbound``, ``remove_outbound``: a removed one drains its own
connections). ``drain(deadline)`` stops accepting, lets
requests in flight finish (idle keep-alive connections are closed at once, busy ones after
their current response) and cuts whatever is left at the deadline.

A plaintext HTTP/1.1 client connection idle between requests (nothing read ahead) for
``forward.PARK_AFTER`` gives up its task: ``serve_requests`` parks it in its listener's
keep-alive room (``meshd.conns.waiting``, one per listener and idle timeout), which closes it
quietly at the idle timeout, when its client goes away, or when the listener stops accepting
(a drain, its removal), and otherwise gives it a new task with its next bytes. It stays the same
connection throughout: counted open, in ``listener.connections``, its caps' slot held
(docs/performance.md, round two: a task and its frames cost ~10 KB per idle connection). TLS,
HTTP/2 and TCP connections keep their task.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from meshd.config.gateway import Gateway, GatewayListener
from meshd.config.schema import HostConfig, ListenerLimits, LocalService, Upstream
from meshd.conns.guard import ConnectionGuard, ListenerGuard, accept_loop
from meshd.conns.waiting import WaitingRoom
from meshd.errors import ProxyError
from meshd.identity.tls import TLSState
from meshd.listen_fds import InheritedSockets
from meshd.metrics import Metrics
from meshd.proxy.access import AccessLog, format_from_env
from meshd.proxy.core.outlier import Ejection
from meshd.proxy.core.ratelimit import RateLimits
from meshd.proxy.core.view import ViewCell
from meshd.proxy.destinations import Destinations
from meshd.proxy.egress import EgressProxy
from meshd.proxy.external import ExternalResolver
from meshd.proxy.forward import FIRST_REQUEST_GRACE, ClientConnection
from meshd.proxy.gateway import GatewayHandler
from meshd.proxy.h2conn import H2Pool
from meshd.proxy.inbound import APP_IDLE_TIMEOUT, Inbound, InboundContext
from meshd.proxy.outbound import Outbound, OutboundContext
from meshd.proxy.pool import DEFAULT_IDLE_TIMEOUT, ConnectionPool
from meshd.proxy.sockio import SocketConnection
from meshd.tracing.tracer import Tracer
from meshd.workers.plan import share

log = logging.getLogger(__name__)

STOP_GRACE = 2.0

ConnectionHandler = Callable[[SocketConnection, ClientConnection], Awaitable[None]]


@dataclass(frozen=True)
class WorkerRole:
    """A proxy run as one of ``count`` worker processes (``meshd.workers``): the listening
    sockets handed to it by listener key, and where the ejections it decides are announced."""

    count: int
    sockets: Mapping[str, list[socket.socket]]
    on_ejection: Callable[[str, Ejection], None] | None = None


@dataclass(frozen=True)
class ListenerSpec:
    """One listener a host's config asks for: its kind, name and address, and what it serves.
    ``key`` names it across processes (the worker processes get its socket by that name)."""

    direction: str  # "inbound" / "outbound" / "gateway"
    name: str  # what it serves, for logs
    host: str
    port: int
    guard_name: str  # its connection caps' name
    service: LocalService | None = None  # outbound: the calling service and its upstream
    upstream: Upstream | None = None
    gateway: Gateway | None = None  # gateway: which, and which of its listeners
    gateway_listener: GatewayListener | None = None

    @property
    def key(self) -> str:
        return f"{self.direction}:{self.name}"


def outbound_spec(config: HostConfig, service: LocalService, upstream: Upstream) -> ListenerSpec:
    name = f"{service.name}->{upstream.name}"
    return ListenerSpec("outbound", name, config.outbound_address, upstream.local_port,
                        f"outbound:{name}", service=service, upstream=upstream)


def listener_specs(config: HostConfig) -> list[ListenerSpec]:
    """Every listener of ``config``, the inbound one first. Pure."""
    specs = [ListenerSpec("inbound", "mesh", config.address, config.inbound_port, "inbound")]
    specs += [outbound_spec(config, service, upstream) for service, upstream in config.upstreams]
    specs += [ListenerSpec("gateway", f"{gateway.name}:{listener.port}", listener.address,
                           listener.port, f"gateway:{gateway.name}:{listener.port}",
                           gateway=gateway, gateway_listener=listener)
              for gateway in config.gateways for listener in gateway.listeners]
    if config.egress_port is not None:  # HTTP_PROXY / HTTPS_PROXY for local apps
        specs.append(ListenerSpec("outbound", "egress", config.outbound_address,
                                  config.egress_port, "outbound:egress"))
    return specs


async def bind_spec(spec: ListenerSpec, inherited: InheritedSockets | None
                    ) -> list[trio.SocketListener]:
    """Listen for ``spec``: on the socket inherited for its address if there is one. A port
    that cannot be bound is a ``ProxyError`` naming it."""
    adopted = inherited.take(spec.host, spec.port) if inherited is not None else None
    if adopted is not None:
        return [trio.SocketListener(trio.socket.from_stdlib_socket(adopted))]
    try:
        return await trio.open_tcp_listeners(spec.port, host=spec.host)
    except OSError as exc:
        raise ProxyError(f"cannot listen on {spec.host}:{spec.port} ({spec.direction} "
                         f"{spec.name}): {exc.strerror or exc}") from exc


@dataclass
class _Listener:
    spec: ListenerSpec
    handle: ConnectionHandler
    sockets: list[trio.SocketListener]
    guard: ListenerGuard  # its connection caps
    accepting: trio.CancelScope = field(default_factory=trio.CancelScope)  # its accept loops
    # its connections, each with a scope that cuts it (a listener removed at runtime)
    connections: dict[ClientConnection, trio.CancelScope] = field(default_factory=dict)
    emptied: trio.Event | None = None  # set when a removed listener's last connection ends
    # while it accepts: its own nursery (accept loops, keep-alive rooms)
    nursery: trio.Nursery | None = None
    # its keep-alive rooms, by idle timeout (one, unless its handlers' timeouts differ)
    rooms: dict[float, WaitingRoom[socket.socket, _Parked]] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return self.spec.direction

    @property
    def name(self) -> str:
        return self.spec.name


class _Parked:
    """A client connection idle between requests in its listener's keep-alive room, and
    what serves it again (``serve_requests`` with its arguments)."""

    __slots__ = ("conn", "listener", "resume", "stream")

    def __init__(self, listener: _Listener, stream: SocketConnection, conn: ClientConnection,
                 resume: Callable[[], Awaitable[None]]) -> None:
        self.listener = listener
        self.stream = stream
        self.conn = conn
        self.resume = resume


class Proxy:
    def __init__(self, config: HostConfig, view: ViewCell, tls: TLSState, metrics: Metrics, *,
                 rand: Callable[[], float] = random.random,
                 inherited: InheritedSockets | None = None, tracer: Tracer | None = None,
                 worker: WorkerRole | None = None) -> None:
        self.config = config
        self._inherited = inherited
        # a worker process: its sockets are handed to it, by listener key; it never binds
        self._given = dict(worker.sockets) if worker is not None else None
        self._resolving = worker is None  # a worker's external endpoints come with the view
        self._workers = worker.count if worker is not None else 1
        self.view = view
        self.tls = tls
        self.metrics = metrics
        self.pool = ConnectionPool(idle_timeout=DEFAULT_IDLE_TIMEOUT)
        self.app_pool = ConnectionPool(idle_timeout=APP_IDLE_TIMEOUT)
        tracer = tracer or Tracer.off()
        # HTTP/2: multiplexed connections to peer meshds, and to apps that speak h2c
        self.h2_pool = H2Pool(DEFAULT_IDLE_TIMEOUT)
        self.app_h2_pool = H2Pool(APP_IDLE_TIMEOUT)
        outbound_ctx = OutboundContext(view=view, tls=tls, metrics=metrics, pool=self.pool,
                                       h2_pool=self.h2_pool, rand=rand, here=config.labels,
                                       tracer=tracer)
        if worker is not None:  # its share of the host's limits; ejections announced
            outbound_ctx.destinations = Destinations(metrics, workers=worker.count,
                                                     on_ejection=worker.on_ejection)
            outbound_ctx.rate_limits = RateLimits(workers=worker.count)
        self._outbound = outbound_ctx
        self.resolver = ExternalResolver(view)  # external destinations' endpoints
        access = AccessLog(format_from_env(default=config.access_log))
        outbound_ctx.access = access
        inbound = Inbound(InboundContext(config, tls, metrics, self.app_pool, view, access,
                                         app_h2_pool=self.app_h2_pool, tracer=tracer))
        # caps at accept; the process's cap is what its open file limit leaves room for
        self.guard = ConnectionGuard(metrics=metrics)
        self._inbound = inbound
        self._listeners = [self._listener(spec) for spec in listener_specs(config)]
        self._permissive = inbound.permissive is not None
        self._connections: set[ClientConnection] = set()
        # accepted connections open, by listener kind
        self._open = {"inbound": 0, "outbound": 0, "gateway": 0}
        self._accepting = trio.CancelScope()
        self._everything = trio.CancelScope()
        self._draining = False
        self._drained = trio.Event()
        self._stopped = trio.Event()
        # where runtime listeners (``add_outbound``) accept, and their connections run
        self._nurseries: tuple[trio.Nursery, trio.Nursery] | None = None

    def _listener(self, spec: ListenerSpec) -> _Listener:
        """``spec``'s listener, with its handler and caps (not bound yet)."""
        handle: ConnectionHandler
        limits = self.config.outbound_limits
        if spec.direction == "inbound":
            handle, limits = self._inbound.handle, self.config.inbound_limits
        elif spec.gateway is not None and spec.gateway_listener is not None:
            # ingress gateways: outside clients, capped like the inbound listener
            handle = GatewayHandler(spec.gateway, spec.gateway_listener, self._outbound).handle
            limits = self.config.inbound_limits
        elif spec.service is not None and spec.upstream is not None:
            handle = Outbound(spec.service, spec.upstream, self._outbound).handle
        else:
            handle = EgressProxy(self._outbound).handle
        if self._workers > 1:  # each worker holds its share of the listener's caps
            limits = ListenerLimits(share(limits.max_connections, self._workers) or 1,
                                    share(limits.max_per_source, self._workers))
        return _Listener(spec, handle, [], self.guard.listener(spec.guard_name, limits))

    # -- addresses (useful with port 0) ----------------------------------------------------------

    @property
    def inbound_address(self) -> tuple[str, int]:
        return self._bound(self._listeners[0])

    @property
    def egress_address(self) -> tuple[str, int]:
        """Where the egress proxy listener accepts (``[outbound] egress_port``)."""
        listener = next((x for x in self._listeners if x.name == "egress"), None)
        if listener is None:
            raise KeyError("no egress listener (outbound.egress_port is not set)")
        return self._bound(listener)

    def outbound_address(self, service: str, upstream: str) -> tuple[str, int]:
        name = f"{service}->{upstream}"
        listener = next((x for x in self._listeners if x.name == name), None)
        if listener is None:
            raise KeyError(f"no outbound listener for {name}")
        return self._bound(listener)

    def gateway_address(self, gateway: str, index: int = 0) -> tuple[str, int]:
        """Where gateway ``gateway``'s ``index``-th listener listens."""
        found = [x for x in self._listeners
                 if x.direction == "gateway" and x.name.split(":", 1)[0] == gateway]
        if index >= len(found):
            raise KeyError(f"no listener {index} for gateway {gateway}")
        return self._bound(found[index])

    @staticmethod
    def _bound(listener: _Listener) -> tuple[str, int]:
        if not listener.sockets:
            raise RuntimeError("the proxy is not listening yet")
        host, port = listener.sockets[0].socket.getsockname()[:2]
        return host, port

    def listening_sockets(self) -> list[tuple[str, trio.socket.SocketType]]:
        """``(direction, socket)`` of every listening socket (to hand to a successor)."""
        return [(listener.direction, sock.socket)
                for listener in self._listeners for sock in listener.sockets]

    # -- observability -------------------------------------------------------------------------

    def open_connections(self) -> dict[str, int]:
        """Accepted connections open now: ``inbound`` (from peers' meshds, or plaintext in
        permissive mode), ``outbound`` (from local apps to upstream listeners) and ``gateway``
        (outside clients of this host's ingress gateways)."""
        return dict(self._open)

    def impose_ejection(self, destination: str, ejection: Ejection) -> None:
        """An ejection another worker process decided, in force here too."""
        self._outbound.destinations.impose(destination, ejection, trio.current_time())

    def endpoint_states(self) -> dict[str, list[dict[str, Any]]]:
        """Read-only: per destination, each endpoint (``node``, ``instance_id``) with its
        outlier ejection state (``ejected``, ``ejection_remaining_seconds``, ``ejections``,
        ``ejection_reason``) and ``active_requests`` (tries and TCP connections in flight from
        this host). Meant to be merged into ``/v1/state``'s ``destinations.*.endpoints``."""
        return self._outbound.endpoint_states(trio.current_time())

    # -- lifetime ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._bind_all()
            with self._everything:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.pool.run)
                    await nursery.start(self.app_pool.run)
                    await nursery.start(self.h2_pool.run)
                    await nursery.start(self.app_h2_pool.run)
                    await nursery.start(self._outbound.mirror.run)
                    await nursery.start(self.guard.run)
                    if self._resolving:
                        await nursery.start(self.resolver.run)
                    async with trio.open_nursery() as connections:
                        with self._accepting:
                            async with trio.open_nursery() as accepting:
                                for listener in self._listeners:
                                    accepting.start_soon(self._run_listener, listener,
                                                         connections)
                                self._nurseries = (accepting, connections)
                                self._log_listening()
                                task_status.started()
                        self._nurseries = None
                        await self._close_listeners()
                    self._drained.set()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._close_listeners()
            self._stopped.set()

    async def drain(self, deadline: float) -> None:
        """Stop accepting, let in-flight requests finish until ``deadline`` (trio clock), then
        cut the rest. Returns once the proxy has stopped. (Parked idle connections close with
        their listener's keep-alive room, which ends with its accept loops.)"""
        self._draining = True
        self._accepting.cancel()
        for conn in list(self._connections):
            _drain_connection(conn)
        with trio.move_on_at(deadline) as scope:
            await self._drained.wait()
        if scope.cancelled_caught:
            log.warning("drain deadline reached: cutting %d connection(s)",
                        len(self._connections))
        self._everything.cancel()
        with trio.move_on_after(STOP_GRACE):
            await self._stopped.wait()

    # -- listeners at runtime (a reload adds and removes upstreams) -----------------------------

    def set_config(self, config: HostConfig) -> None:
        """The configuration in force after a reload: inbound requests for a service added
        live reach its app (listeners follow ``add_outbound`` / ``remove_outbound``)."""
        self.config = config
        self._inbound.ctx.config = config

    def give_sockets(self, service: LocalService, upstream: Upstream,
                     sockets: list[socket.socket]) -> None:
        """A worker process: the listening sockets for ``add_outbound(service, upstream)``."""
        if self._given is None:
            raise ProxyError("only a worker process is given its sockets")
        self._given[outbound_spec(self.config, service, upstream).key] = sockets

    async def add_outbound(self, service: LocalService, upstream: Upstream
                           ) -> list[trio.socket.SocketType]:
        """Open the outbound listener for ``service``'s ``upstream`` and accept on it, beside
        the others (none of which is touched). Returns its sockets; a port that cannot be bound
        is a ``ProxyError`` naming it, and nothing changed."""
        if self._nurseries is None or self._draining:
            raise ProxyError("the proxy is not accepting connections (starting or stopping)")
        listener = self._listener(outbound_spec(self.config, service, upstream))
        await self._bind(listener)
        accepting, connections = self._nurseries
        self._listeners.append(listener)
        accepting.start_soon(self._run_listener, listener, connections)
        host, port = self._bound(listener)
        log.info("outbound listener %s on %s:%d (added by a reload)", listener.name, host, port)
        return [sock.socket for sock in listener.sockets]

    async def remove_outbound(
        self, service: str, upstream: str, deadline: float,
        *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> int:
        """Close ``service``'s listener for ``upstream`` at once (new connections are
        refused), let its connections finish their requests in flight until ``deadline``
        (idle keep-alive ones close now, as in ``drain``), then cut what is left. Other
        listeners and their connections are not touched. Started (``nursery.start``) once the
        port is closed, with the addresses it listened on; returns how many were cut."""
        name = f"{service}->{upstream}"
        listener = next((x for x in self._listeners
                         if x.direction == "outbound" and x.name == name), None)
        if listener is None:
            task_status.started([])
            return 0
        self._listeners.remove(listener)
        listener.accepting.cancel()
        sockets, listener.sockets = listener.sockets, []
        addresses = [sock.socket.getsockname()[:2] for sock in sockets]
        for sock in sockets:
            await trio.aclose_forcefully(sock)
        task_status.started([(str(host), int(port)) for host, port in addresses])
        listener.emptied = trio.Event()
        for conn in list(listener.connections):
            _drain_connection(conn)
        if listener.connections:
            log.info("outbound listener %s closed: draining %d connection(s)", name,
                     len(listener.connections))
            with trio.move_on_at(deadline):
                await listener.emptied.wait()
        cut = len(listener.connections)
        for scope in list(listener.connections.values()):
            scope.cancel()
        log.info("outbound listener %s removed%s", name,
                 f": drain deadline reached, {cut} connection(s) cut" if cut else
                 ", its connections finished")
        return cut

    # -- internals -----------------------------------------------------------------------------

    async def _bind_all(self) -> None:
        for listener in self._listeners:
            try:
                await self._bind(listener)
            except ProxyError:
                await self._close_listeners()
                raise

    async def _bind(self, listener: _Listener) -> None:
        """Listen for ``listener``: on the socket handed to this process for it (a worker
        process: ``given``, by the listener's key), else as ``bind_spec`` does."""
        if self._given is not None:
            given = self._given.pop(listener.spec.key, None)
            if not given:
                raise ProxyError(f"no socket was handed over for {listener.direction} "
                                 f"listener {listener.name}")
            listener.sockets = [trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                                for sock in given]
            return
        listener.sockets = await bind_spec(listener.spec, self._inherited)

    async def _close_listeners(self) -> None:
        # close, never shutdown(): an inherited socket stays listening for its other holders
        for listener in self._listeners:
            sockets, listener.sockets = listener.sockets, []
            for sock in sockets:
                await trio.aclose_forcefully(sock)

    def _log_listening(self) -> None:
        for listener in self._listeners:
            host, port = self._bound(listener)
            log.info("%s listener %s on %s:%d", listener.direction, listener.name, host, port)

    async def _run_listener(self, listener: _Listener, connections: trio.Nursery) -> None:
        """Accept on each of ``listener``'s sockets, and run its keep-alive rooms, until its
        ``accepting`` scope is cancelled (a drain, its removal, the proxy stopping)."""
        try:
            with listener.accepting:
                async with trio.open_nursery() as nursery:
                    listener.nursery = nursery
                    for sock in listener.sockets:
                        nursery.start_soon(self._accept_loop, listener, sock, connections)
        finally:
            listener.nursery = None

    async def _accept_loop(self, listener: _Listener, sock: trio.SocketListener,
                           connections: trio.Nursery) -> None:
        def accept_failed(_exc: OSError) -> None:
            self.metrics.connection_errors.labels(listener.direction, "accept_failed").inc()

        async def serve(accepted: trio.SocketStream, peer: str) -> bool:
            return await self._serve_connection(listener, accepted, peer)

        # A strict mTLS listener's clients speak first: they wait for their ClientHello
        # without a task. (Not outbound listeners, where a TCP upstream's server may speak
        # first, nor a permissive inbound one, which may carry such a protocol in plaintext.)
        timeout = self.config.inbound_handshake_timeout
        first_byte = timeout if (listener.direction == "inbound" and not self._permissive) \
            or listener.direction == "gateway" else None

        def silent(peer: str) -> None:
            log.debug("%s connection from %s sent nothing within %gs: closed",
                      listener.direction, peer, timeout)
            self.metrics.connection_errors.labels(listener.direction, "handshake_timeout").inc()

        await accept_loop(sock, listener.guard, serve, connections, accept_failed,
                          first_byte_timeout=first_byte, on_silent=silent)

    async def _serve_connection(self, listener: _Listener, accepted: trio.SocketStream,
                                peer: str) -> bool:
        """Serve an accepted connection: False once it is closed, True if it was parked
        (still open; its caps' slot is then released by ``_close`` when it closes)."""
        # the raw stream takes the socket over (sockio: the request path's I/O)
        stream = SocketConnection.from_trio(accepted.socket)
        conn = ClientConnection(peer, draining=self._draining or listener.emptied is not None)
        conn.park = partial(self._park, listener, stream, conn)
        self._connections.add(conn)
        self._open[listener.direction] = self._open.get(listener.direction, 0) + 1
        return await self._serve(listener, stream, conn, partial(listener.handle, stream, conn),
                                 releases=False)

    async def _serve(self, listener: _Listener, stream: SocketConnection,
                     conn: ClientConnection, serving: Callable[[], Awaitable[None]], *,
                     releases: bool) -> bool:
        """One task of a connection: ``serving()``, then the connection is closed (and its
        caps' slot released if ``releases``), unless it was parked meanwhile (True)."""
        parks = conn.parks
        try:
            with trio.CancelScope() as scope:
                listener.connections[conn] = scope
                await serving()
        except Exception:
            # A bug in one connection must not take the listener down with it.
            log.exception("%s listener %s: connection from %s failed", listener.direction,
                          listener.name, conn.peer)
        finally:
            handed_over = conn.parks != parks  # parked by this task: no longer its own
            if not handed_over:
                self._close(listener, stream, conn, release=releases)
        return handed_over

    def _close(self, listener: _Listener, stream: SocketConnection, conn: ClientConnection, *,
               release: bool) -> None:
        """A connection is done: out of the books, closed, and its caps' slot released if
        ``release`` (else ``accept_loop`` releases it)."""
        self._connections.discard(conn)
        listener.connections.pop(conn, None)
        if listener.emptied is not None and not listener.connections:
            listener.emptied.set()
        self._open[listener.direction] -= 1
        conn.park = None  # (it refers back to conn)
        stream.close()
        if release:
            listener.guard.release(conn.peer)

    # -- idle keep-alive connections without a task --------------------------------------------

    def _park(self, listener: _Listener, stream: SocketConnection, conn: ClientConnection,
              client: trio.abc.Stream, resume: Callable[[], Awaitable[None]],
              idle_timeout: float) -> bool:
        """``ClientConnection.park`` of a connection of ``listener``: into the listener's
        keep-alive room for ``idle_timeout``, if ``client`` is the plaintext socket stream
        itself (not TLS over it) and the listener is still accepting."""
        if client is not stream:  # TLS over it (or another layer): never; not asked again
            conn.park = None
            return False
        if listener.nursery is None or conn.draining:
            return False
        room = listener.rooms.get(idle_timeout)
        if room is None:
            room = listener.rooms[idle_timeout] = WaitingRoom(
                idle_timeout, self._wake, self._close_parked, self._close_parked,
                on_close=self._close_parked)
            listener.nursery.start_soon(room.run)
        try:
            room.add(stream.socket, _Parked(listener, stream, conn, resume))
        except OSError:  # closed (the listener is stopping), or no descriptor for its selector
            return False
        conn.parks += 1
        return True

    def _wake(self, _sock: socket.socket, parked: _Parked) -> None:
        """Bytes came for a parked connection: a new task serves them."""
        if parked.listener.nursery is not None and self._nurseries is not None:
            try:
                self._nurseries[1].start_soon(self._resume, parked)
                return
            except RuntimeError:  # the connections nursery is closed: the proxy is stopping
                pass
        self._close(parked.listener, parked.stream, parked.conn, release=True)

    async def _resume(self, parked: _Parked) -> None:
        await self._serve(parked.listener, parked.stream, parked.conn, parked.resume,
                          releases=True)

    def _close_parked(self, _sock: socket.socket, parked: _Parked) -> None:
        """A parked connection's idle timeout, its client gone, or its listener's end (a
        drain, its removal, the proxy stopping: an idle connection closes at once): closed
        quietly, its caps' slot released."""
        self._close(parked.listener, parked.stream, parked.conn, release=True)


def _drain_connection(conn: ClientConnection) -> None:
    """Mark ``conn`` draining: closed now if idle between requests, after its current response
    otherwise; one just accepted gets a moment for its first request."""
    conn.draining = True
    if conn.drain_hook is not None:
        conn.drain_hook()
        return
    if conn.idle_scope is None:
        return
    if conn.served:  # idle between requests: closed now
        conn.idle_scope.cancel()
    else:  # its first request may be on its way (``serve_requests``)
        conn.idle_scope.deadline = min(conn.idle_scope.deadline,
                                       trio.current_time() + FIRST_REQUEST_GRACE)
