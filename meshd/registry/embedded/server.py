"""The embedded registry's trio shell: HTTP in, state core, durable log, blocking waits, timers.

``serve_registry`` is the whole server (the CLI and tests start it with ``nursery.start``). Every
write goes the same way, under one lock: plan against the state (pure), append to the log and
fsync (worker thread), apply, wake the watchers of the changed topics. Nobody sees a write before
it is durable, so a watcher can never observe an index that a crash would take back.

Blocking queries are event-driven: a waiter registers one ``trio.Event`` under each topic its
answer depends on and sleeps until one is set or its deadline passes; a write sets only the
events of the topics it changed. An idle watcher costs one task and a few dict entries.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from os import PathLike

import trio

from meshd.config.schema import ListenerLimits
from meshd.errors import RegistryError
from meshd.httpd import Request, Response, serve_http
from meshd.registry.embedded.acl import AclConfig, initial_management_accessor
from meshd.registry.embedded.checks import MIN_INTERVAL, CheckRunner
from meshd.registry.embedded.http import (
    QueryOptions,
    Read,
    Router,
    Write,
    error_response,
    finish,
    must_block,
    query_options,
    with_common_headers,
)
from meshd.registry.embedded.metrics import KNOWN_METHODS, UNMATCHED, RegistryMetrics
from meshd.registry.embedded.persist import DEFAULT_COMPACT_BYTES, DataDir
from meshd.registry.embedded.routes import KV_MAX_VALUE, Api, ApiSettings
from meshd.registry.embedded.routes_metrics import METRICS_PATHS, MetricsApi
from meshd.registry.embedded.state import REAP_MINIMUM, RegistryState, Wake
from meshd.registry.embedded.store.records import ApiError, Mutation
from meshd.registry.embedded.store.sessions import SESSION_TTL_MIN

log = logging.getLogger(__name__)

REAP_INTERVAL = 30.0
# connection caps: a meshd holds one blocking query per destination it watches, and a client
# may park a thousand (Consul's own default per client, 200, is lower)
DEFAULT_LIMITS = ListenerLimits(10_000, 1024)


class Notifier:
    """Wakes blocking queries by topic, KV key and KV prefix."""

    def __init__(self) -> None:
        self._topics: dict[str, set[trio.Event]] = {}
        self._prefixes: dict[str, set[trio.Event]] = {}

    async def wait(self, read: Read, deadline: float) -> None:
        event = trio.Event()
        keys = [(self._topics, t) for t in read.topics]
        if read.kv_key is not None:
            keys.append((self._topics, f"kv:{read.kv_key}"))
        if read.kv_prefix is not None:
            keys.append((self._prefixes, read.kv_prefix))
        for table, key in keys:
            table.setdefault(key, set()).add(event)
        try:
            with trio.move_on_at(deadline):
                await event.wait()
        finally:
            for table, key in keys:
                waiters = table.get(key)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del table[key]

    def wake(self, wake: Wake) -> None:
        for topic in (*wake.topics, *(f"kv:{k}" for k in wake.kv_keys)):
            for event in self._topics.pop(topic, ()):
                event.set()
        if wake.kv_keys and self._prefixes:
            for prefix in [p for p in self._prefixes if any(k.startswith(p)
                                                            for k in wake.kv_keys)]:
                for event in self._prefixes.pop(prefix):
                    event.set()


@dataclass(frozen=True)
class RegistryConfig:
    host: str = "127.0.0.1"
    port: int = 8500
    data_dir: str | PathLike[str] | None = None
    node_name: str = "meshd-registry"
    datacenter: str = "dc1"
    advertise: str | None = None  # node address; default: the listen address
    reap_interval: float = REAP_INTERVAL
    reap_minimum: float = REAP_MINIMUM
    compact_bytes: int = DEFAULT_COMPACT_BYTES  # snapshot + new log once the log is this big
    acl_enabled: bool = False  # Consul's acl.enabled; off by default, as `consul agent -dev`
    acl_default_policy: str = "allow"  # Consul's default; meshd's guides use "deny"
    acl_initial_management: str | None = None  # Consul's acl.tokens.initial_management
    acl_master_token: str | None = None  # deprecated: enabled + deny + initial management
    allow_unauthenticated: bool = False  # listen beyond loopback with ACLs off
    session_ttl_min: float = SESSION_TTL_MIN  # Consul's session_ttl_min
    check_min_interval: float = MIN_INTERVAL  # HTTP/TCP check intervals are raised to this
    limits: ListenerLimits = DEFAULT_LIMITS  # connection caps at accept

    def acl(self) -> AclConfig:
        if self.acl_master_token:
            return AclConfig.from_master_token(self.acl_master_token)
        return AclConfig(enabled=self.acl_enabled, default_policy=self.acl_default_policy,
                         initial_management=self.acl_initial_management or None)

    def validate(self) -> None:
        """Refuse a configuration that would expose the registry; ``RegistryError`` says why."""
        acl = self.acl()
        if acl.default_policy not in ("allow", "deny"):
            raise RegistryError(f"ACL default policy must be allow or deny, not "
                                f"{acl.default_policy!r}")
        if acl.initial_management and not acl.enabled:
            raise RegistryError("an initial management token needs ACLs enabled "
                                "(--acl-enabled)")
        if not acl.enabled and not self.allow_unauthenticated and not is_loopback(self.host):
            raise RegistryError(
                f"refusing to listen on {self.host} with ACLs off: anyone who can reach it could "
                "change the mesh. Enable ACLs (--acl-enabled --acl-default-policy deny "
                "--acl-initial-management TOKEN), listen on 127.0.0.1, or pass "
                "--allow-unauthenticated to accept the risk")


class RegistryServer:
    def __init__(self, config: RegistryConfig, state: RegistryState,
                 data: DataDir | None = None) -> None:
        self.config = config
        self.state = state
        self.data = data
        self.notifier = Notifier()
        self.acl = config.acl()
        api = Api(state, ApiSettings(datacenter=config.datacenter, acl=self.acl,
                                     session_ttl_min=config.session_ttl_min))
        self.default_policy = api.acl.default_policy
        self.router = Router(api.routes())
        self.metrics = RegistryMetrics(state)
        self.metrics_api = MetricsApi(api.acl, lambda: api.node.name, self.metrics.registry)
        self.checks = CheckRunner(state, self.commit, min_interval=config.check_min_interval)
        self._write_lock = trio.Lock()
        self._timers_changed = trio.Event()

    # --- HTTP ------------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        try:
            response = await self._handle(request)
        except ApiError as exc:
            response = error_response(exc)
        except RegistryError as exc:
            log.error("%s %s failed: %s", request.method, request.path, exc)
            response = Response.text(str(exc), 500)
        method = request.method if request.method in KNOWN_METHODS else "other"
        self.metrics.http_requests.labels(method, self._route_label(request.path),
                                          str(response.status)).inc()
        return with_common_headers(response, self.default_policy)

    def _route_label(self, path: str) -> str:
        if path in METRICS_PATHS or path in ("/", ""):
            return path or "/"
        found = self.router.match(path)
        return found[0].path if found is not None else UNMATCHED

    async def _handle(self, request: Request) -> Response:
        if request.path in ("/", ""):
            if request.method not in ("GET", "HEAD"):
                return Response.text(f"method {request.method} not allowed", 405,
                                     [("Allow", "OPTIONS,GET,HEAD")])
            return Response.text("meshd embedded registry: Consul HTTP API subset under /v1/\n")
        if request.path in METRICS_PATHS:
            self.metrics_api.authorize(request)
            return await trio.to_thread.run_sync(self.metrics_api.render, request)
        routed = self.router.dispatch(request)
        if isinstance(routed, Response):
            return routed
        endpoint, tail = routed
        options = query_options(request) if request.method == "GET" else None
        result = endpoint(request, tail)
        if isinstance(result, Write):
            return await self._write(result)
        return await self._read(endpoint, request, tail, result, options)

    async def _read(self, endpoint: Callable[[Request, str], Read | Write], request: Request,
                    tail: str, read: Read | Write, options: QueryOptions | None) -> Response:
        assert isinstance(read, Read)
        if options is None or not must_block(read, options):
            return finish(read, options)
        deadline = trio.current_time() + options.wait + random.uniform(0, options.wait / 16)
        with self.metrics.blocking_queries.track_inprogress():
            while True:
                await self.notifier.wait(read, deadline)
                again = endpoint(request, tail)  # re-run: the answer is current even on timeout
                assert isinstance(again, Read)
                read = again
                if not must_block(read, options) or trio.current_time() >= deadline:
                    return finish(read, options)

    # --- writes ----------------------------------------------------------------------------------

    async def _write(self, write: Write) -> Response:
        mutation = await self.commit(write.plan)
        return write.respond(mutation)

    async def commit(self, plan: Callable[[RegistryState, float], Mutation]) -> Mutation:
        """Plan, make durable, apply and announce one write. Not cancellable once planned: a
        client hanging up must not leave a logged write unapplied."""
        async with self._write_lock:
            mutation = plan(self.state, trio.current_time())
            with trio.CancelScope(shield=True):
                if mutation.ops and self.data is not None:
                    await trio.to_thread.run_sync(self._append, self.data, mutation)
                wake = self.state.apply(mutation, trio.current_time())
                self.metrics.wrote(mutation)
                self.notifier.wake(wake)
                self._timers_changed.set()
                self.checks.checks_changed(mutation.ops)
                if self.data is not None and self.data.needs_compaction():
                    snapshot = self.data.snapshot_bytes(self.state)
                    try:
                        await trio.to_thread.run_sync(self.data.compact, snapshot)
                        self.metrics.compactions.inc()
                    except RegistryError as exc:
                        self.metrics.log_errors.labels("compact").inc()
                        # this write is durable and applied: answer it; the log keeps growing
                        # and the next write tries again (or is refused, if durability of the
                        # directory is now in doubt)
                        log.error("%s", exc)
        return mutation

    def _append(self, data: DataDir, mutation: Mutation) -> None:
        """Append and fsync one write (in a worker thread), timed and counted."""
        started = time.perf_counter()
        try:
            data.append(mutation)
        except RegistryError:
            self.metrics.log_errors.labels("append").inc()
            raise
        self.metrics.log_append.observe(time.perf_counter() - started)

    # --- timers ----------------------------------------------------------------------------------

    async def run_timers(self) -> None:
        """TTL check and TTL session expiry (as soon as a deadline passes) and the
        critical-service reaper sweep."""
        next_reap = trio.current_time() + self.config.reap_interval
        while True:
            due = self.state.next_deadline()
            deadline = next_reap if due is None else min(due, next_reap)
            with trio.move_on_at(deadline):
                await self._timers_changed.wait()
            self._timers_changed = trio.Event()
            now = trio.current_time()
            due = self.state.next_deadline()
            if due is not None and due <= now:
                await self.commit(partial(_at, RegistryState.plan_ttl_expiry, now))
                expired = await self.commit(
                    partial(_at, RegistryState.plan_session_expiry, now))
                if expired.ops:
                    log.info("sessions invalidated by TTL: %s", ", ".join(
                        op.key for op in expired.ops if op.table == "session"))
            if now >= next_reap:
                mutation = await self.commit(partial(_at, RegistryState.plan_reap, now))
                removed = sorted({op.key for op in mutation.ops if op.table == "service"})
                if removed:
                    log.info("deregistered services critical for too long: %s",
                             ", ".join(removed))
                next_reap = now + self.config.reap_interval


def _at(plan: Callable[[RegistryState, float], Mutation], at: float, state: RegistryState,
        now: float) -> Mutation:
    """A timer's plan, run for the time ``at`` at which the timer fired."""
    return plan(state, at)


def load_state(config: RegistryConfig, data: DataDir | None) -> RegistryState:
    """Build the state (from disk when there is a data directory) and boot the standing state."""
    state = RegistryState(reap_minimum=config.reap_minimum)
    if data is not None:
        loaded = data.load(state)
        log.info("loaded registry data from %s: index %d, %d services, %d keys (%d log records)",
                 data.path, state.index, sum(s.agent for s in state.services.values()),
                 len(state.kv.entries), loaded.records_replayed)
    return state


async def serve_registry(
    config: RegistryConfig,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the embedded registry until cancelled.

    ``task_status.started`` receives the listening sockets once the server accepts connections
    (so ``port=0`` works: read the port from ``listeners[0].socket.getsockname()``). Raises
    ``RegistryError`` if the data directory is corrupt or locked, or the address is taken.
    """
    config.validate()
    data = None
    if config.data_dir is not None:
        data = DataDir.open(config.data_dir, compact_bytes=config.compact_bytes)
    try:
        await _serve(config, data, task_status)
    finally:
        if data is not None:
            data.close()


async def _serve(config: RegistryConfig, data: DataDir | None,
                 task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
    address = config.advertise or _advertise_address(config.host)
    state = load_state(config, data)
    server = RegistryServer(config, state, data)
    node_id = state.node.id if state.node is not None else str(uuid.uuid4())
    await server.commit(lambda s, _: s.plan_boot(
        node_name=config.node_name, node_id=node_id, address=address,
        datacenter=config.datacenter))
    if server.acl.enabled:
        initial = server.acl.initial_management
        accessor = initial_management_accessor(initial or "")
        created = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        await server.commit(lambda s, _: s.plan_acl_boot(
            initial_management=initial, initial_accessor=accessor, created=created))
    state.restart_timers(trio.current_time())
    failure: OSError | None = None
    async with trio.open_nursery() as nursery:
        try:
            listeners = await nursery.start(_listen, server, config)
        except OSError as exc:
            failure = exc  # raised below, outside the nursery, so callers get it ungrouped
        else:
            log.info("registry listening on http://%s:%d (node %s, datacenter %s, %s)",
                     config.host, listen_port(listeners), config.node_name, config.datacenter,
                     f"data in {config.data_dir}" if config.data_dir else "in memory")
            nursery.start_soon(server.run_timers)
            await nursery.start(server.checks.run)
            task_status.started(listeners)
    if failure is not None:
        raise RegistryError(f"cannot listen on {config.host}:{config.port}: "
                            f"{failure.strerror or failure}") from failure


async def _listen(server: RegistryServer, config: RegistryConfig,
                  task_status: trio.TaskStatus[list[trio.SocketListener]]
                  = trio.TASK_STATUS_IGNORED) -> None:
    await serve_http(server.handle, config.host, config.port, task_status=task_status,
                     max_body=2 * KV_MAX_VALUE, limits=config.limits, listener="registry")


def is_loopback(host: str) -> bool:
    """Whether a listen address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _advertise_address(host: str) -> str:
    if host in ("", "0.0.0.0", "::", "localhost"):
        return "127.0.0.1"
    return host


def listen_port(listeners: Iterable[trio.SocketListener]) -> int:
    """The TCP port of the first listener (for servers started on port 0)."""
    for listener in listeners:
        return int(listener.socket.getsockname()[1])
    raise RegistryError("registry has no listener")
