"""The per-host daemon's lifetime tree.

    Daemon.run
      ├─ identities: renew with the node certificate, or join with the token (keys generated
      │  here, only CSRs sent); then meshd.identity.manager renews them and follows the deny list
      ├─ admin server            (/healthz /readyz /metrics /v1/state; over mTLS for operators
      │                           when [admin] tls = true, started once the node cert is in hand)
      ├─ route-table watcher     (registry KV, blocking query)
      ├─ endpoint watchers       (one per upstream destination, blocking queries)
      ├─ proxy                   (outbound listener per upstream, inbound mTLS listener)
      └─ health reporters        (probe each local app, feed its TTL checks)

Ready means: identities in hand, first route table and endpoint views read, every listener
accepting and every local service registered. ``stop()`` (SIGTERM) deregisters first so peers
stop choosing this host, drains in-flight requests until a deadline, then cancels the tree.
SIGHUP re-reads meshd.toml and applies what can change without a restart (``meshd.daemon.reload``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import trio

from meshd import systemd
from meshd.admin.server import AdminAPI
from meshd.admin.state import DaemonState, build_state
from meshd.backoff import backoff_delay
from meshd.config.parse import routes_to_data
from meshd.config.schema import HostConfig, LocalService, RouteTable
from meshd.daemon.health import probe, probe_client, report_health
from meshd.errors import CAError, ConfigError, MeshError, Problem, RegistryError
from meshd.fileio import write_atomic
from meshd.identity.ca_client import CARefusedError
from meshd.identity.certs import Identity, TrustBundle
from meshd.identity.manager import IdentityManager
from meshd.identity.signing import Signed
from meshd.identity.tls import TLSState
from meshd.metrics import Metrics
from meshd.proxy.core.view import ViewCell
from meshd.proxy.server import Proxy
from meshd.registry import registration
from meshd.registry.config_store import Accepted, Refused, Trust, judge_stored
from meshd.registry.consul import ConsulClient, registry_token
from meshd.registry.model import EndpointSet, ProbeResult
from meshd.registry.watch import WatchStatus, watch_endpoints, watch_routes

log = logging.getLogger(__name__)

DRAIN_DEADLINE = 10.0
FIRST_DENYLIST_WAIT = 5.0
DEREGISTER_TIMEOUT = 5.0


def routes_file(config: HostConfig) -> Path:
    """Where a meshd keeps the last route table it applied from the registry."""
    return config.state_dir / "routes.json"


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
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.view = ViewCell()
        self.state = DaemonState()
        self.proxy: Proxy | None = None
        self._tls: TLSState | None = None
        self._cancel = trio.CancelScope()
        self._consul: ConsulClient | None = None
        self._registered: list[str] = []
        self._registry_lock = trio.Lock()
        self._reporters = trio.CancelScope()
        self._reporter_round = trio.CancelScope()  # cancelled to restart reporters (reload)
        self.ready_event = trio.Event()  # set once, when the daemon first becomes ready
        self.status_note = ""  # appended to the systemd status line (e.g. a refused reload)
        self.identity = IdentityManager.for_config(
            config, lambda: read_join_token(self.config), metrics=self.metrics,
            on_change=self._identities_changed)
        self.state.identity = self.identity.status
        self.identity.on_revoked = self._signer_revoked
        # the newest signed table ever applied: an older one is a replay, even after the table
        # in force was dropped because its signer was revoked
        self._version_floor: Signed | None = None

    def _identities_changed(self, bundle: TrustBundle, identities: dict[str, Identity]) -> None:
        self.state.bundle, self.state.identities = bundle, identities

    # -- callbacks from watchers -------------------------------------------------------------

    def _judge_routes(self, raw: bytes | None, source: str | None = None) -> Accepted | Refused:
        """``judge_stored`` against this meshd's trust bundle and deny list, with the signed
        table in force (an older one is a replay) and the clock now."""
        bundle = self.state.bundle
        if bundle is None or self._tls is None:  # (watchers start after the join)
            return Refused("no_trust_bundle", "no trust bundle yet to verify the route table")
        trust = Trust(bundle, self._tls.denied, datetime.now(UTC), self._version_floor)
        return (judge_stored(raw, trust) if source is None
                else judge_stored(raw, trust, source))

    def _apply_routes(self, accepted: Accepted, source: str = "registry") -> None:
        view = self.view.set_routes(accepted.table)
        self.metrics.config_generation.set(view.generation)
        self.metrics.config_reloads.labels("applied").inc()
        self.state.last_config_error = ""
        self.state.routes_source = source
        self.state.routes_signed = self._version_floor = signed = accepted.signed
        log.info("route table generation %d applied from the %s (version %d signed by %s at "
                 "%s): %s", view.generation, source, signed.version, signed.signer_id,
                 signed.summary()["signed_at"],
                 routes_to_data(accepted.table)["destinations"] or "(cleared)")
        if source == "registry":
            self._keep_on_disk(accepted.raw)
        if self.state.ready:
            systemd.notify(status=self.status_line())

    def _reject_routes(self, refused: Refused) -> None:
        self.metrics.config_reloads.labels("rejected").inc()
        self.metrics.config_refused.labels(refused.code).inc()
        self.state.last_config_error = refused.reason
        log.error("route table in the registry refused (%s), generation %d (from the %s) stays "
                  "in force:\n%s", refused.code, self.view.current.generation,
                  self.state.routes_source, refused.reason)

    def _signer_revoked(self, serials: frozenset[str]) -> None:
        """The CA revoked the certificate that signed the table in force: its content can no
        longer be trusted (a stolen key may have signed it), so it is dropped, here and on
        disk, and every service follows the default deny until an operator applies a table
        signed with another certificate."""
        signed = self.state.routes_signed
        if signed is None or signed.serial not in serials:
            return
        self.view.set_routes(RouteTable())
        self.state.routes_signed, self.state.routes_source = None, "none"
        self.state.last_config_error = (
            f"the route table in force (version {signed.version}) was signed by "
            f"{signed.signer_id} with certificate {signed.serial}, which the CA revoked: the "
            "table is dropped and every service follows the default deny until an operator "
            "applies a table signed with another certificate")
        self.metrics.config_refused.labels("revoked").inc()
        log.error("%s", self.state.last_config_error)
        with contextlib.suppress(FileNotFoundError):
            routes_file(self.config).unlink()

    def _keep_on_disk(self, raw: bytes) -> None:
        """The last good table's signed envelope, for a start while the registry is away (a
        small file written only when the operator changes the table: written here, on the
        event loop)."""
        path = routes_file(self.config)
        try:
            write_atomic(path, raw, 0o600)
        except OSError as exc:
            log.warning("cannot keep the route table in %s: %s", path, exc)

    def _load_from_disk(self) -> None:
        """Put the last good table in force before the registry answers, once its signature
        verifies again against the trust bundle and deny list (fail closed: without one, no
        table is in force and every service follows the default deny)."""
        path = routes_file(self.config)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read the last good route table %s: %s", path, exc)
            return
        judged = self._judge_routes(raw, str(path))
        if isinstance(judged, Refused):
            log.warning("the route table kept in %s is not usable: %s", path, judged.reason)
            return
        self._apply_routes(judged, "disk")

    def _apply_endpoints(self, endpoints: EndpointSet) -> None:
        self.view.set_endpoints(endpoints)

    def _record_health(self, service: str, result: ProbeResult) -> None:
        self.state.health[service] = result
        self.metrics.local_health.labels(service).set(1 if result.status == "passing" else 0)

    # -- observability -------------------------------------------------------------------------

    def refresh_gauges(self) -> None:
        now = trio.current_time()
        stale = [w.staleness(now) for w in self.state.watches.values()]
        self.metrics.registry_staleness.set(max(stale, default=0.0))
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
        proc = psutil.Process(os.getpid())
        with proc.oneshot():
            process = {
                "pid": proc.pid,
                "cpu_seconds": sum(proc.cpu_times()[:2]),
                "rss_bytes": proc.memory_info().rss,
                "open_fds": proc.num_fds(),
            }
        return build_state(
            config=self.config, view=self.view.current, state=self.state,
            now_monotonic=trio.current_time(), now_wall=time.time(), process=process,
            registry_url=self.config.registry_url,
            endpoint_states=self.proxy.endpoint_states() if self.proxy is not None else None,
            connections=self.proxy.open_connections() if self.proxy is not None else None,
        )

    # -- lifetime ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        with self._cancel:
            async with ConsulClient(config.registry_url,
                                    token=registry_token(config.registry_token)) as consul:
                self._consul = consul
                try:
                    async with trio.open_nursery() as n:
                        await self._start(consul, n)
                        task_status.started()
                finally:
                    # however the tree ends (stop, error, cancellation): no entry left behind
                    await self._deregister_all()

    async def _start(self, consul: ConsulClient, n: trio.Nursery) -> None:
        config = self.config
        admin = AdminAPI(self.metrics, lambda: self.state.ready, self.snapshot,
                         self.refresh_gauges, allowed_hosts=config.admin_allowed_hosts,
                         limits=config.admin_limits)
        if not config.admin_tls:  # (over TLS it needs the node certificate: started below)
            await n.start(admin.serve, config.admin_host, config.admin_port)
            log.info("admin API on http://%s:%d", config.admin_host, config.admin_port)

        systemd.notify(status=f"getting certificates from the CA at {config.ca.url}")
        bundle, identities = await self._join_with_retry()
        self.state.bundle, self.state.identities = bundle, identities
        tls = TLSState(cert_dir(config), config.trust_domain, [s.name for s in config.services],
                       admin=config.admin_tls)
        self._tls = tls
        await n.start(self.identity.run, tls)  # renewals, deny list, roots
        # the deny list before any route table is judged: a table signed by a certificate the
        # CA revoked is never put in force, not even briefly at start
        with trio.move_on_after(FIRST_DENYLIST_WAIT):
            await self.identity.denylist_read.wait()
        if not self.identity.denylist_read.is_set():
            log.warning("no deny list from the CA within %gs: route tables are verified "
                        "without it for now (a table whose signer is revoked is dropped as "
                        "soon as the deny list arrives)", FIRST_DENYLIST_WAIT)
        if config.admin_tls:
            await n.start(partial(admin.serve, config.admin_host, config.admin_port, tls=tls))
            log.info("admin API on https://%s:%d (operator certificates only)",
                     config.admin_host, config.admin_port)

        self._load_from_disk()
        systemd.notify(status=f"reading routes and endpoints from {config.registry_url}")
        routes_status = self.state.watches.setdefault("routes", WatchStatus("routes"))
        await n.start(self._wait_for_registry, "route table",
                      watch_routes, consul, self._judge_routes, self._apply_routes,
                      self._reject_routes, routes_status)
        for dest in sorted({u.name for _, u in config.upstreams}):
            status = self.state.watches.setdefault(f"endpoints/{dest}",
                                                   WatchStatus(f"endpoints/{dest}"))
            await n.start(self._wait_for_registry, f"endpoints of {dest}",
                          watch_endpoints, consul, dest, self._apply_endpoints, status)

        self.proxy = Proxy(config, self.view, tls, self.metrics)
        await n.start(self.proxy.run)

        systemd.notify(status=f"registering {len(config.services)} service(s)")
        await self._register_all(consul)
        await n.start(self._report_health, consul)
        if not self.state.stopping:
            self.state.ready = True
            self.ready_event.set()
            log.info("meshd %s ready: inbound %s:%d, %d service(s), %d upstream(s)",
                     config.node, config.address, config.inbound_port,
                     len(config.services), len(config.upstreams))

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

    # -- registration --------------------------------------------------------------------------

    async def _register_all(self, consul: ConsulClient) -> None:
        """Register every local service and its proxy, each check starting in the state of a
        first probe of the app."""
        async with probe_client() as http:
            for svc in self.config.services:
                first = await probe(svc, http)
                first.at = trio.current_time()
                self._record_health(svc.name, first)
                await self._register(consul, svc, first)

    async def _register(self, consul: ConsulClient, svc: LocalService,
                        health: ProbeResult) -> None:
        """Register ``svc`` and its proxy, retrying with backoff. Serialised with
        deregistration, and a no-op once stopping, so a SIGTERM during start-up never leaves
        an entry behind."""
        for definition in (registration.app_registration(self.config, svc, health.status),
                           registration.proxy_registration(self.config, svc, health.status)):
            attempt = 0
            while True:
                async with self._registry_lock:
                    if self.state.stopping:
                        return
                    try:
                        await consul.register_service(definition)
                    except RegistryError as exc:
                        error = exc
                    else:
                        if definition["ID"] not in self._registered:
                            self._registered.append(definition["ID"])
                        log.info("registered %s in %s (%s)", definition["ID"],
                                 self.config.registry_url, health.status)
                        break
                attempt += 1
                log.warning("registering %s failed (attempt %d): %s", definition["ID"],
                            attempt, error)
                await trio.sleep(backoff_delay(attempt, random.random()))

    async def _report_health(
        self, consul: ConsulClient,
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The health reporters, under one scope that ``stop()`` cancels before it
        deregisters (so no TTL update races the deregistration)."""
        started = False
        with self._reporters:
            while True:  # one round per health settings in force (a reload starts a new one)
                config = self.config
                self._reporter_round = trio.CancelScope()
                with self._reporter_round:
                    async with trio.open_nursery() as nursery:
                        for svc in config.services:
                            sid = registration.service_id(config, svc)
                            checks = (registration.check_id(sid),
                                      registration.check_id(registration.proxy_id(config, svc)))

                            async def reregister(result: ProbeResult,
                                                 svc: LocalService = svc) -> None:
                                await self._register(consul, svc, result)

                            await nursery.start(
                                report_health, svc, consul, checks,
                                lambda r, name=svc.name: self._record_health(name, r),
                                reregister)
                        if not started:
                            task_status.started()
                            started = True
                        await trio.sleep_forever()

    async def apply_live_config(self, config: HostConfig, health_changed: Sequence[str]) -> None:
        """Put a reloaded configuration in force (``meshd.daemon.reload`` decides what may change:
        only health checks). Services whose check changed are registered again (their TTL
        follows the interval) before their reporters restart with the new settings."""
        self.config = config
        if not health_changed or not self.state.ready or self._consul is None:
            return
        for name in health_changed:
            svc = config.service(name)
            last = self.state.health.get(name)
            if svc is not None and last is not None:
                await self._register(self._consul, svc, last)
        self._reporter_round.cancel()

    def status_line(self) -> str:
        """One line for ``systemctl status``: what this meshd is doing, in numbers."""
        config = self.config
        n_services, n_upstreams = len(config.services), len(config.upstreams)
        line = (f"{'ready' if self.state.ready else 'not ready'}: "
                f"{n_services} service{'s' * (n_services != 1)}, "
                f"{n_upstreams} upstream{'s' * (n_upstreams != 1)}, "
                f"generation {self.view.current.generation}")
        return f"{line}; {self.status_note}" if self.status_note else line

    async def _deregister_all(self) -> None:
        """Remove every entry this daemon registered (shielded, bounded)."""
        with trio.CancelScope(shield=True), trio.move_on_after(DEREGISTER_TIMEOUT):
            async with self._registry_lock:
                while self._registered and self._consul is not None:
                    sid = self._registered.pop()
                    try:
                        await self._consul.deregister_service(sid)
                        log.info("deregistered %s", sid)
                    except RegistryError as exc:
                        log.warning("deregistering %s failed: %s", sid, exc)

    async def stop(self) -> None:
        """Graceful stop: stop reporting health, deregister (so peers stop choosing this host),
        drain in-flight requests until a deadline, then end the lifetime tree."""
        if self.state.stopping:
            return
        self.state.stopping = True
        self.state.ready = False
        self._reporters.cancel()
        await self._deregister_all()
        if self.proxy is not None:
            with trio.CancelScope(shield=True):
                await self.proxy.drain(trio.current_time() + DRAIN_DEADLINE)
        self._cancel.cancel()


async def run_daemon(config: HostConfig, config_path: Path | None = None) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully; SIGHUP re-reads ``config_path``
    (default: the file the config came from) and applies what it safely can
    (``meshd.daemon.reload``).

    Under systemd (``Type=notify``): ``READY=1`` once the daemon is ready, ``STATUS=`` lines
    along the way, watchdog pings while the event loop runs, ``STOPPING=1`` on SIGTERM.
    Reloads wait until the daemon is ready and run one at a time; signals that arrive while one
    is pending coalesce (the pending reload reads the newest file)."""
    import signal

    from meshd.daemon.reload import reload_from_file

    path = config_path or Path(config.source)
    if config.outbound_beyond_loopback:
        log.warning("outbound listeners bind %s, beyond loopback, because: %s",
                    config.outbound_address, config.outbound_beyond_loopback)
    daemon = Daemon(config)
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
            systemd.notify(ready=True, status=daemon.status_line())
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
