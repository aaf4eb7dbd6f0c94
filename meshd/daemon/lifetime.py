"""The per-host daemon's lifetime tree.

    Daemon.run
      ├─ identities: renew with the node certificate, or join with the token (keys generated
      │  here, only CSRs sent); then meshd.identity.manager renews them and follows the deny list
      ├─ admin server            (/healthz /readyz /metrics /v1/state; over mTLS for operators
      │                           when [admin] tls = true, started once the node cert is in hand)
      ├─ registry heartbeat      (when the registry last answered: staleness, watch restarts)
      ├─ route-table watcher     (registry KV, blocking query; meshd.daemon.route_table)
      ├─ endpoint watchers       (one per upstream destination, blocking queries)
      ├─ last known endpoints    (kept on disk, coalesced writes; meshd.daemon.last_known)
      ├─ proxy                   (outbound listener per upstream, inbound mTLS listener)
      └─ registration, then health reporters (probe each local app, feed its TTL checks)

A meshd that ran before starts from what it last knew: the signed route table and the endpoints
kept in ``state_dir`` (verified again against the trust bundle on disk) are in force before the
registry answers, so with the registry unreachable it serves at once, marked stale, while the
watchers and the registration keep trying in the background.

Ready means: identities in hand, a route table and endpoint views (from the registry, or the
last known ones from disk), every listener accepting, and every local service registered (or,
when started from the last known state, registration under way: a proxy serving what it last
knew is ready, as an Envoy serving its last config is). ``stop()`` (SIGTERM) deregisters first so
peers stop choosing this host, drains in-flight requests until ``drain_timeout``, then cancels
the tree. The listening sockets may come from a predecessor and outlive this process
(``meshd.listen_fds``: systemd's fd store, ``meshd up``, or an in-place upgrade through
``meshd.daemon.handover``, which ends with ``stop(deregister=False)``: the successor serves under
the same service IDs).
SIGHUP re-reads meshd.toml and applies what can change without a restart (``meshd.daemon.reload``):
health checks, services and upstreams added or removed (``apply_live_config``).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import trio

from meshd import systemd
from meshd.admin.server import AdminAPI
from meshd.admin.state import DaemonState, build_state, not_ready_reasons
from meshd.backoff import backoff_delay
from meshd.config.schema import HostConfig
from meshd.daemon import handover, listeners
from meshd.daemon.last_known import EndpointKeeper, endpoints_file, load_last_known
from meshd.daemon.registrar import Registrar
from meshd.daemon.reload import (
    Change,
    ReloadPlan,
    with_failures,
    without_service,
    without_services,
    without_upstream,
)
from meshd.daemon.route_table import RouteTableInForce
from meshd.errors import (
    CAError,
    ConfigError,
    IdentityError,
    MeshError,
    Problem,
    ProxyError,
)
from meshd.identity.ca_client import CARefusedError
from meshd.identity.certs import Identity, TrustBundle
from meshd.identity.manager import IdentityManager
from meshd.identity.tls import TLSState
from meshd.listen_fds import InheritedSockets
from meshd.metrics import Metrics
from meshd.proxy.core.view import ViewCell
from meshd.proxy.server import Proxy
from meshd.registry.consul import ConsulClient, registry_token
from meshd.registry.model import EndpointSet, ProbeResult
from meshd.registry.watch import (
    ContactSignal,
    RegistryContact,
    WatchStatus,
    heartbeat,
    watch_endpoints,
    watch_routes,
)
from meshd.tracing.tracer import Tracer
from meshd.workers.plan import worker_count
from meshd.workers.supervisor import Spares, WorkerSet, usable_cores

log = logging.getLogger(__name__)

FIRST_DENYLIST_WAIT = 5.0
# started from the last known state: how long registration may hold readiness back (the
# registry may be the very thing that is down; registration goes on in the background)
REGISTER_WAIT_FROM_DISK = 1.0


def cert_dir(config: HostConfig) -> Path:
    return config.state_dir / "certs"


def read_join_token(config: HostConfig) -> str:
    """The join token, from the file meshd.toml names (an operator's problem if unreadable)."""
    path = config.ca.token_file
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError([Problem(config.source, "ca.token_file",
                                   f"cannot read join token {path}: {exc.strerror}")]) from exc
    if not token:
        raise ConfigError([Problem(config.source, "ca.token_file",
                                   f"join token file {path} is empty")])
    return token


class Daemon:
    def __init__(self, config: HostConfig, inherited: InheritedSockets | None = None) -> None:
        self.config = config
        self.inherited = inherited or InheritedSockets()
        self._admin_sockets: list[trio.SocketListener] = []
        self._admin_scope = trio.CancelScope()
        self.metrics = Metrics()
        self.tracer = Tracer.for_host(config, os.environ, self.metrics)  # OTLP spans, or off
        self.view = ViewCell()
        self.state = DaemonState()
        self.proxy: Proxy | WorkerSet | None = None
        # data-plane processes: 1, this one serves; more, a supervisor of worker processes
        self.workers = worker_count(config.workers, os.environ, usable_cores())
        self.metrics.workers.set(self.workers)
        self._spares = Spares()  # worker processes started early, waiting for the proxy
        self._tls: TLSState | None = None
        self._cancel = trio.CancelScope()
        self._consul: ConsulClient | None = None
        self._nursery: trio.Nursery | None = None  # the lifetime tree's (a reload starts tasks)
        self._endpoint_scopes: dict[str, trio.CancelScope] = {}  # per destination watched
        self.ready_event = trio.Event()  # set once, when the daemon first becomes ready
        self.status_note = ""  # appended to the systemd status line (e.g. a refused reload)
        self.identity = IdentityManager.for_config(
            config, lambda: read_join_token(self.config), metrics=self.metrics,
            on_change=self._identities_changed)
        self.state.identity = self.identity.status
        self.contact = ContactSignal(RegistryContact())
        self.state.contact = self.contact.contact
        self.routes = RouteTableInForce(config.state_dir, self.view, self.metrics, self.state,
                                        self._route_trust, self._routes_changed)
        self.identity.on_revoked = self.routes.signer_revoked
        self.registrar = Registrar(lambda: self.config, lambda: self.state.stopping,
                                   self._record_health, self.contact)
        self.registered = self.registrar.registered  # set once every service was registered
        self.known_endpoints = EndpointKeeper(
            endpoints_file(config.state_dir), config.trust_domain,
            lambda: self.view.current.endpoints, time.time)

    def _identities_changed(self, bundle: TrustBundle, identities: dict[str, Identity]) -> None:
        self.state.bundle, self.state.identities = bundle, identities

    # -- callbacks from watchers -------------------------------------------------------------

    def _route_trust(self) -> tuple[TrustBundle, frozenset[str]] | None:
        """What route tables are verified against now: the trust bundle and deny list."""
        if self.state.bundle is None or self._tls is None:
            return None
        return self.state.bundle, self._tls.denied

    def _routes_changed(self) -> None:
        if self.state.ready:
            systemd.notify(status=self.status_line())

    def _apply_endpoints(self, endpoints: EndpointSet) -> None:
        self.view.set_endpoints(endpoints)
        self.known_endpoints.changed()

    def _record_health(self, service: str, result: ProbeResult) -> None:
        self.state.health[service] = result
        self.metrics.local_health.labels(service).set(1 if result.status == "passing" else 0)

    # -- the last known state ------------------------------------------------------------------

    def registry_stale(self, now: float) -> bool:
        last = self.contact.contact.last_contact
        return any(w.stale(now, last) for w in self.state.watches.values())

    def registry_staleness(self, now: float) -> float:
        last = self.contact.contact.last_contact
        return max((w.staleness(now, last) for w in self.state.watches.values()), default=0.0)

    # -- observability -------------------------------------------------------------------------

    def refresh_gauges(self) -> None:
        now = trio.current_time()
        self.metrics.registry_staleness.set(self.registry_staleness(now))
        self.metrics.registry_stale.set(1 if self.registry_stale(now) else 0)
        for service, identity in self.state.identities.items():
            self.metrics.cert_expiry.labels(service).set(identity.not_after.timestamp())
        self.metrics.endpoints.clear()
        for name, eps in self.view.current.endpoints.items():
            counts: dict[tuple[str, str], int] = {}
            for e in eps.endpoints:
                key = (e.version, "true" if e.healthy else "false")
                counts[key] = counts.get(key, 0) + 1
            for (version, healthy), n in counts.items():
                self.metrics.endpoints.labels(name, version, healthy).set(n)

    def snapshot(self) -> Mapping[str, Any]:
        import psutil  # only the admin API's state needs it: loaded by the first /v1/state

        proc = psutil.Process(os.getpid())
        with proc.oneshot():
            process = {
                "pid": proc.pid,
                "cpu_seconds": sum(proc.cpu_times()[:2]),
                "rss_bytes": proc.memory_info().rss,
                "open_fds": proc.num_fds(),
            }
        if isinstance(self.proxy, WorkerSet):
            process["workers"] = self.proxy.processes()
        return build_state(
            config=self.config, view=self.view.current, state=self.state,
            now_monotonic=trio.current_time(), now_wall=time.time(), process=process,
            registry_url=self.config.registry_url,
            endpoint_states=self.proxy.endpoint_states() if self.proxy is not None else None,
            connections=self.proxy.open_connections() if self.proxy is not None else None,
            external=self.proxy.resolver.status() if self.proxy is not None else None,
        )

    # -- lifetime ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        with self._cancel:
            async with ConsulClient(config.registry_url,
                                    token=registry_token(config.registry_token)) as consul:
                self._consul = consul
                try:
                    if self.workers > 1:  # their imports overlap this process's start
                        await self._spares.start(self.workers)
                    async with trio.open_nursery() as n:
                        await self._start(consul, n)
                        task_status.started()
                finally:
                    await self._spares.close()
                    # however the tree ends (stop, error, cancellation): no entry left behind
                    await self._deregister_all()

    async def _start(self, consul: ConsulClient, n: trio.Nursery) -> None:
        config = self.config
        self._nursery = n
        admin = AdminAPI(self.metrics, lambda: not_ready_reasons(self.config, self.state),
                         self.snapshot, self.refresh_gauges,
                         allowed_hosts=config.admin_allowed_hosts,
                         limits=config.admin_limits, gather=self._gather_workers)
        if not config.admin_tls:  # (over TLS it needs the node certificate: started below)
            await n.start(self._serve_admin, admin, None)
            log.info("admin API on http://%s:%d", config.admin_host, config.admin_port)

        systemd.notify(status=f"getting certificates from the CA at {config.ca.url}")
        bundle, identities = await self._join_with_retry()
        self.state.bundle, self.state.identities = bundle, identities
        tls = TLSState(cert_dir(config), config.trust_domain, config.identities,
                       admin=config.admin_tls)
        self._tls = tls
        await n.start(self.identity.run, tls)  # renewals, deny list, roots
        await self._first_denylist()
        if config.admin_tls:
            await n.start(self._serve_admin, admin, tls)
            log.info("admin API on https://%s:%d (operator certificates only)",
                     config.admin_host, config.admin_port)

        destinations = list(config.destinations)
        now = trio.current_time()
        for name in ["routes", *(f"endpoints/{d}" for d in destinations)]:
            self.state.watches.setdefault(name, WatchStatus(name, created=now))
        from_disk = load_last_known(self.routes, self.known_endpoints, self.view,
                                    self.state.watches, destinations,
                                    now_monotonic=trio.current_time(), now_wall=time.time())
        await n.start(heartbeat, consul, self.contact)
        n.start_soon(self._announce_contact_changes)
        await n.start(self.known_endpoints.run)
        systemd.notify(status=f"reading routes and endpoints from {config.registry_url}")
        watches: list[tuple[str, Any, tuple[Any, ...]]] = [
            ("route table", watch_routes, (consul, self.routes.judge, self.routes.apply,
                                           self.routes.reject, self.state.watches["routes"]))]
        watches += [(f"endpoints of {dest}", self._endpoint_watcher(dest),
                     (consul, dest, self._apply_endpoints, self.state.watches[f"endpoints/{dest}"]))
                    for dest in destinations]
        for what, watcher, args in watches:
            if from_disk:  # serving the last known state: the watchers catch up meanwhile
                n.start_soon(partial(watcher, *args, self.contact))
            else:
                await n.start(self._wait_for_registry, what, watcher, *args, self.contact)

        await n.start(self.tracer.run)  # the span exporter
        if self.workers > 1:
            workers = WorkerSet(config, self.view, tls, self.metrics, self.workers,
                                inherited=self.inherited, spares=self._spares)
            self.metrics.worker_families = workers.worker_families
            self.proxy = workers
        else:
            self.proxy = Proxy(config, self.view, tls, self.metrics, inherited=self.inherited,
                               tracer=self.tracer)
        await n.start(self.proxy.run)
        listeners.settle(self.inherited, self.listening_sockets())

        systemd.notify(status=f"registering {len(config.services)} service(s)")
        n.start_soon(self._register_then_report, consul)
        with trio.move_on_after(REGISTER_WAIT_FROM_DISK if from_disk else math.inf):
            await self.registered.wait()
        if not self.registered.is_set():
            log.warning("not registered in %s yet: ready with the last known state, "
                        "registration goes on in the background", config.registry_url)
        else:
            self.known_endpoints.changed()  # (a first run with no upstream keeps an empty file)
        if not self.state.stopping:
            self.state.ready = True
            self.ready_event.set()
            log.info("meshd %s ready: inbound %s:%d, %d service(s), %d upstream(s)%s",
                     config.node, config.address, config.inbound_port,
                     len(config.services), len(config.upstreams),
                     " (from the last known state: stale until the registry answers)"
                     if self.registry_stale(trio.current_time()) else "")

    async def _gather_workers(self) -> None:
        """Before the admin API answers: the worker processes' metrics and state."""
        if isinstance(self.proxy, WorkerSet):
            await self.proxy.gather()

    async def _first_denylist(self) -> None:
        """The deny list before any route table is judged: a table signed by a certificate the
        CA revoked is never put in force, not even briefly at start. Not waited for when the CA
        did not answer at start (certificates from disk): the table is judged without it and
        dropped as soon as the deny list arrives, if its signer is revoked."""
        if self.identity.status.failures == 0:
            with trio.move_on_after(FIRST_DENYLIST_WAIT):
                await self.identity.denylist_tried.wait()
        if not self.identity.denylist_read.is_set():
            log.warning("no deny list from the CA yet: route tables are verified without it for "
                        "now (a table whose signer is revoked is dropped as soon as the deny "
                        "list arrives)")

    async def _announce_contact_changes(self) -> None:
        """The systemd status line follows the registry contact (stale / current)."""
        while True:
            await self.contact.changed().wait()
            if self.state.ready:
                systemd.notify(status=self.status_line())

    async def _serve_admin(
        self, admin: AdminAPI, tls: TLSState | None,
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The admin API, on the inherited socket for its address if there is one, under a
        scope a handover cancels (the successor answers from then on)."""
        config = self.config
        inherited = self.inherited.take(config.admin_host, config.admin_port)
        with self._admin_scope:
            async with trio.open_nursery() as nursery:
                self._admin_sockets = await nursery.start(partial(
                    admin.serve, config.admin_host, config.admin_port, tls=tls,
                    inherited=inherited))
                task_status.started()

    def listening_sockets(self) -> list[tuple[str, trio.socket.SocketType]]:
        """``(role, socket)`` of every listening socket: the proxy's and the admin API's."""
        found = self.proxy.listening_sockets() if self.proxy is not None else []
        return found + [("admin", lst.socket) for lst in self._admin_sockets]

    async def _join_with_retry(self) -> tuple[TrustBundle, dict[str, Identity]]:
        """Join the CA; while it is unreachable (or failing), retry with backoff and stay not
        ready. A refusal (bad, expired or used-up token; a service the token does not allow)
        needs an operator, so it ends the daemon with the CA's reason."""
        attempt = 0
        while True:
            try:
                return await self.identity.obtain()
            except CARefusedError as exc:
                if exc.status < 500:
                    raise
                error: CAError = exc
            except CAError as exc:
                error = exc
            delay = backoff_delay(attempt, random.random())
            attempt += 1
            log.warning("cannot join the CA yet (attempt %d, next in %.1fs): %s",
                        attempt, delay, error)
            systemd.notify(status=f"cannot join the CA yet (attempt {attempt}): {error}")
            await trio.sleep(delay)

    async def _wait_for_registry(
        self, what: str, watcher: Any, *args: Any,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run a watcher; log while its first answer is slow (registry down at boot)."""
        nag_scope = trio.CancelScope()

        async def nag() -> None:
            with nag_scope:
                while True:
                    await trio.sleep(5)
                    log.warning("still waiting for the registry (%s) at %s",
                                what, self.config.registry_url)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(nag)
            await nursery.start(watcher, *args)
            nag_scope.cancel()
            task_status.started()

    async def _register_then_report(self, consul: ConsulClient) -> None:
        def registered() -> None:
            self.state.registered = True

        await self.registrar.register_then_report(consul, registered)

    def _endpoint_watcher(self, destination: str) -> Any:
        """``watch_endpoints`` under a scope of its own: a reload that removes the last
        upstream to ``destination`` ends its watch."""
        scope = self._endpoint_scopes[destination] = trio.CancelScope()

        async def watcher(*args: Any,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await watch_endpoints(*args, task_status=task_status)

        return watcher

    def _follow_destinations(self, config: HostConfig, consul: ConsulClient,
                             n: trio.Nursery) -> None:
        """Watch the destinations of the upstreams in force, and only those."""
        wanted = set(config.destinations)
        for dest in sorted(wanted - self._endpoint_scopes.keys()):
            status = self.state.watches.setdefault(
                f"endpoints/{dest}", WatchStatus(f"endpoints/{dest}",
                                                 created=trio.current_time()))
            n.start_soon(partial(self._endpoint_watcher(dest), consul, dest,
                                 self._apply_endpoints, status, self.contact))
        for dest in sorted(self._endpoint_scopes.keys() - wanted):
            self._endpoint_scopes.pop(dest).cancel()
            self.state.watches.pop(f"endpoints/{dest}", None)

    async def apply_live_config(self, plan: ReloadPlan) -> ReloadPlan:
        """Put a reloaded configuration in force (``meshd.daemon.reload`` decides what may
        change live) and return what is in force. In order: removed upstreams' listeners close
        (their connections drain in the background until ``drain_timeout``), removed services
        are deregistered, added services get certificates from the CA with the node
        certificate (refused: they stay out, with the CA's reason), then the configuration is
        in force, added upstreams' listeners open (a port that cannot be bound: that upstream
        stays out), destinations are watched or no longer, added services are registered, and
        reporters restart with the settings in force. Other listeners are never touched."""
        n, proxy, tls, consul = self._nursery, self.proxy, self._tls, self._consul
        if n is None or proxy is None or tls is None or consul is None or self.state.stopping:
            return with_failures(plan, self.config, [
                dataclasses.replace(c, note="meshd is not running") for c in plan.applied])
        config, failed = plan.config, []
        deadline = trio.current_time() + config.drain_timeout
        for service_name, upstream_name in plan.upstreams_removed:
            closed = await n.start(proxy.remove_outbound, service_name, upstream_name, deadline)
            listeners.forget("outbound", closed)
        if plan.services_removed:
            running = self.config
            # out of the config in force first: no reporter registers them again meanwhile
            self.config = without_services(running, plan.services_removed)
            self.registrar.restart_reporters()
            await self.registrar.deregister(running, plan.services_removed)
            self.identity.release(plan.services_removed, tls)
            for name in plan.services_removed:
                self.state.health.pop(name, None)
        if plan.services_added:
            try:
                await self.identity.claim(list(config.identities), tls)
            except (CAError, IdentityError) as exc:
                for name in plan.services_added:
                    failed.append(_failed_change(
                        plan, f"services.{name}", f"the CA issued no certificate for it: {exc} "
                        "(a node may claim only the services its join token named: mint a "
                        "token naming it, meshd ca token --node NODE --services ..., and "
                        "restart)"))
                    config = without_service(config, name)
        self.config = config
        proxy.set_config(config)
        for service_name, upstream_name in plan.upstreams_added:
            svc = config.service(service_name)
            upstream = next((u for u in svc.upstreams if u.name == upstream_name),
                            None) if svc is not None else None
            if svc is None or upstream is None:
                continue  # its service was not added
            try:
                listeners.keep("outbound", await proxy.add_outbound(svc, upstream))
            except ProxyError as exc:
                failed.append(_failed_change(
                    plan, f"services.{service_name}.upstreams.{upstream_name}", str(exc)))
                config = without_upstream(config, service_name, upstream_name)
                self.config = config
                proxy.set_config(config)
        self._follow_destinations(config, consul, n)
        for name in plan.services_added:
            svc = config.service(name)
            if svc is not None:  # registered in the background: the registry may be slow
                n.start_soon(self.registrar.register_added, consul, svc)
        for name in plan.health_changed:
            svc = config.service(name)
            last = self.state.health.get(name)
            if svc is not None and last is not None:
                await self.registrar.register(consul, svc, last)
        if plan.health_changed or plan.services_added or plan.services_removed:
            self.registrar.restart_reporters()
        return with_failures(plan, config, failed)

    def status_line(self) -> str:
        """One line for ``systemctl status``: what this meshd is doing, in numbers."""
        config = self.config
        n_services, n_upstreams = len(config.services), len(config.upstreams)
        line = (f"{'ready' if self.state.ready else 'not ready'}: "
                f"{n_services} service{'s' * (n_services != 1)}, "
                f"{n_upstreams} upstream{'s' * (n_upstreams != 1)}, "
                f"generation {self.view.current.generation}")
        now = trio.current_time()
        if self.registry_stale(now):
            line += (f"; registry stale for {_ago(self.registry_staleness(now))}: serving the "
                     "last known state")
        if not self.registered.is_set():
            line += "; registration pending"
        return f"{line}; {self.status_note}" if self.status_note else line

    async def _deregister_all(self) -> None:
        """Remove every entry this daemon registered (shielded, bounded)."""
        if self._consul is not None:
            await self.registrar.deregister_all(self._consul)

    async def stop(self, *, deregister: bool = True) -> None:
        """Graceful stop: stop reporting health, deregister (so peers stop choosing this host),
        drain in-flight requests until ``drain_timeout``, then end the lifetime tree.

        ``deregister=False`` ends a handover: a successor serves under the same service IDs
        and keeps their checks passing, so the entries stay, and so does the admin API (it is
        the successor's now: this process stops answering on it at once)."""
        if self.state.stopping:
            return
        self.state.stopping = True
        self.state.ready = False
        self.registrar.stop_reporting()
        if deregister:
            await self._deregister_all()
        else:
            self._admin_scope.cancel()
            await self.registrar.hand_over()  # the successor's entries now
        if self.proxy is not None:
            with trio.CancelScope(shield=True):
                await self.proxy.drain(trio.current_time() + self.config.drain_timeout)
        self._cancel.cancel()


def _failed_change(plan: ReloadPlan, key: str, note: str) -> Change:
    """The plan's change of ``key``, with why it could not be made."""
    return next((dataclasses.replace(c, note=note) for c in plan.applied if c.key == key),
                Change(key, "", "", note))


def _ago(seconds: float) -> str:
    return f"{max(0.0, seconds):.0f}s"


def settle_heap() -> None:
    """Once ready: what start-up built and the process keeps to its end (modules, config,
    listeners, the first identities and tables) is moved out of the garbage collector's view,
    after start-up's garbage is collected, so a full collection under load walks only what was
    made since: 16-19 ms pauses became about 5 ms (docs/performance.md, "A smaller process,
    and a profile of the hop")."""
    gc.collect()
    gc.freeze()


async def run_daemon(config: HostConfig, config_path: Path | None = None) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully; SIGHUP re-reads ``config_path``
    (default: the file the config came from) and applies what it safely can
    (``meshd.daemon.reload``).

    Under systemd (``Type=notify``): ``READY=1`` once the daemon is ready, ``STATUS=`` lines
    along the way, watchdog pings while the event loop runs, ``STOPPING=1`` on SIGTERM.

    Listening sockets passed with ``LISTEN_FDS`` are served instead of binding new ones; without
    them, a meshd already running with this configuration hands its own over
    (``meshd.daemon.handover``) and is told to finish once this one is ready. Once ready, this
    one offers its sockets the same way to a successor.
    Reloads wait until the daemon is ready and run one at a time; signals that arrive while one
    is pending coalesce (the pending reload reads the newest file)."""
    import signal

    from meshd.daemon.reload import reload_from_file

    path = config_path or Path(config.source)
    if config.outbound_beyond_loopback:
        log.warning("outbound listeners bind %s, beyond loopback, because: %s",
                    config.outbound_address, config.outbound_beyond_loopback)
    inherited = InheritedSockets.from_environment()
    successor = None if len(inherited) else await handover.take_over(config)
    daemon = Daemon(config, successor.sockets if successor is not None else inherited)
    reload_send, reload_receive = trio.open_memory_channel[None](1)
    async with trio.open_nursery() as nursery:

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                           signal.SIGHUP) as receiver:
                async for signum in receiver:
                    if signum == signal.SIGHUP:
                        log.info("received SIGHUP%s", "" if daemon.state.ready
                                 else ": the reload waits until meshd is ready")
                        try:
                            reload_send.send_nowait(None)
                        except trio.WouldBlock:
                            pass  # one is pending already, and it will read the newest file
                        continue
                    log.info("received %s, stopping", signal.Signals(signum).name)
                    systemd.notify(stopping=True, status="stopping: deregistering, draining")
                    await daemon.stop()
                    return

        async def announce_ready_then_reload() -> None:
            await daemon.ready_event.wait()
            if successor is not None:
                await successor.finish()
            systemd.notify(ready=True, status=daemon.status_line())
            settle_heap()
            nursery.start_soon(partial(
                handover.serve, daemon.config,
                lambda: listeners.named(daemon.listening_sockets()),
                partial(daemon.stop, deregister=False)))
            async for _ in reload_receive:
                if daemon.state.stopping:
                    return
                await reload_from_file(daemon, path)

        async def main() -> None:
            try:
                await daemon.run()
            finally:
                nursery.cancel_scope.cancel()

        nursery.start_soon(signals)
        nursery.start_soon(announce_ready_then_reload)
        nursery.start_soon(systemd.watchdog_task)
        nursery.start_soon(main)


__all__ = ["Daemon", "MeshError", "run_daemon"]
