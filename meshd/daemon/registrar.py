"""A meshd's entries in the registry: registration, health reporting, deregistration.

    Registrar.register_then_report
      ├─ register every local service and its proxy (first probe's state), retrying with
      │  backoff that ends early when the heartbeat sees the registry come back
      └─ health reporters        (one round per settings in force; a reload starts a new one)

Registration and deregistration are serialised by one lock, and a registration is a no-op once
the daemon stops (or once a reload removed the service), so a SIGTERM during start-up never
leaves an entry behind. ``stop_reporting`` is called before deregistering so no TTL update races
the deregistration; ``hand_over`` forgets the entries instead (an in-place upgrade's successor
serves under the same service IDs).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import trio

from meshd.backoff import backoff_delay
from meshd.config.schema import HostConfig, LocalService
from meshd.daemon.health import probe, probe_client, report_health
from meshd.errors import RegistryError
from meshd.registry import registration
from meshd.registry.consul import ConsulClient
from meshd.registry.model import ProbeResult
from meshd.registry.watch import ContactSignal

log = logging.getLogger(__name__)

DEREGISTER_TIMEOUT = 5.0


class Registrar:
    def __init__(self, config: Callable[[], HostConfig], stopping: Callable[[], bool],
                 record_health: Callable[[str, ProbeResult], None],
                 contact: ContactSignal) -> None:
        self._config = config  # the configuration in force (a reload replaces it)
        self._stopping = stopping
        self._record_health = record_health
        self._contact = contact
        self._consul: ConsulClient | None = None
        self._registered: list[str] = []  # service IDs this daemon registered
        self._lock = trio.Lock()
        self._reporters = trio.CancelScope()
        self._round = trio.CancelScope()  # cancelled to restart the reporters
        self.registered = trio.Event()  # set once every local service was first registered

    # -- the lifetime ------------------------------------------------------------------------

    async def register_then_report(self, consul: ConsulClient,
                                   on_registered: Callable[[], None]) -> None:
        self._consul = consul
        await self._register_all(consul)
        self.registered.set()
        on_registered()
        await self._report_health(consul)

    def restart_reporters(self) -> None:
        """The reporters start again with the settings in force (a reload changed them)."""
        self._round.cancel()

    def stop_reporting(self) -> None:
        self._reporters.cancel()

    async def hand_over(self) -> None:
        """The entries are a successor's now: never deregistered by this process."""
        async with self._lock:
            self._registered.clear()

    # -- registration ------------------------------------------------------------------------

    async def _register_all(self, consul: ConsulClient) -> None:
        """Register every local service and its proxy, each check starting in the state of a
        first probe of the app."""
        async with probe_client() as http:
            for svc in self._config().services:
                first = await probe(svc, http)
                first.at = trio.current_time()
                self._record_health(svc.name, first)
                await self.register(consul, svc, first)
            for gateway in self._config().gateways:
                first = await probe(registration.gateway_probe_target(gateway), http)
                await self._register_definition(
                    consul, registration.gateway_registration(self._config(), gateway,
                                                              first.status),
                    first, lambda: True)

    async def register(self, consul: ConsulClient, svc: LocalService,
                       health: ProbeResult) -> None:
        """Register ``svc`` and its proxy, retrying with backoff. Serialised with
        deregistration, and a no-op once stopping, so a SIGTERM during start-up never leaves
        an entry behind."""
        config = self._config()
        for definition in (registration.app_registration(config, svc, health.status),
                           registration.proxy_registration(config, svc, health.status)):
            await self._register_definition(
                consul, definition, health,
                lambda: self._config().service(svc.name) is not None)

    async def _register_definition(self, consul: ConsulClient, definition: dict[str, Any],
                                   health: ProbeResult, wanted: Callable[[], bool]) -> None:
        """Register one entry, retrying with backoff while ``wanted`` (a reload may remove
        it) and not stopping."""
        config = self._config()
        attempt = 0
        while True:
            async with self._lock:
                if self._stopping() or not wanted():
                    return  # (stopping, or removed by a reload)
                try:
                    await consul.register_service(definition)
                except RegistryError as exc:
                    error = exc
                else:
                    if definition["ID"] not in self._registered:
                        self._registered.append(definition["ID"])
                    log.info("registered %s in %s (%s)", definition["ID"],
                             config.registry_url, health.status)
                    break
            attempt += 1
            log.warning("registering %s failed (attempt %d): %s", definition["ID"],
                        attempt, error)
            # the backoff ends early when the heartbeat sees the registry come back
            with trio.move_on_after(backoff_delay(attempt, random.random())):
                await self._contact.changed().wait()

    async def register_added(self, consul: ConsulClient, svc: LocalService) -> None:
        """A service a reload added: probed, registered, then reported like the others."""
        async with probe_client() as http:
            first = await probe(svc, http)
        first.at = trio.current_time()
        self._record_health(svc.name, first)
        await self.register(consul, svc, first)
        self._round.cancel()

    async def _report_health(
        self, consul: ConsulClient,
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The health reporters, under one scope that ``stop_reporting`` cancels before the
        daemon deregisters (so no TTL update races the deregistration)."""
        started = False
        with self._reporters:
            while True:  # one round per health settings in force (a reload starts a new one)
                config = self._config()
                self._round = trio.CancelScope()
                with self._round:
                    async with trio.open_nursery() as nursery:
                        for gateway in config.gateways:
                            target = registration.gateway_probe_target(gateway)
                            definition = registration.gateway_registration(config, gateway)

                            async def again(result: ProbeResult,
                                            definition: dict[str, Any] = definition) -> None:
                                await self._register_definition(
                                    consul, {**definition, "Check": {
                                        **definition["Check"], "Status": result.status}},
                                    result, lambda: True)

                            await nursery.start(
                                report_health, target, consul,
                                (registration.check_id(definition["ID"]),),
                                lambda r, name=gateway.name: self._record_health(name, r),
                                again)
                        for svc in config.services:
                            sid = registration.service_id(config, svc)
                            checks = (registration.check_id(sid),
                                      registration.check_id(registration.proxy_id(config, svc)))

                            async def reregister(result: ProbeResult,
                                                 svc: LocalService = svc) -> None:
                                await self.register(consul, svc, result)

                            await nursery.start(
                                report_health, svc, consul, checks,
                                lambda r, name=svc.name: self._record_health(name, r),
                                reregister)
                        if not started:
                            task_status.started()
                            started = True
                        await trio.sleep_forever()

    # -- deregistration ----------------------------------------------------------------------

    async def deregister(self, config: HostConfig, names: Sequence[str]) -> None:
        """Remove the entries of local services ``names`` (app and proxy), bounded."""
        ids = [i for svc in config.services if svc.name in names
               for i in (registration.service_id(config, svc),
                         registration.proxy_id(config, svc))]
        with trio.move_on_after(DEREGISTER_TIMEOUT):
            async with self._lock:
                for sid in ids:
                    if sid not in self._registered or self._consul is None:
                        continue
                    self._registered.remove(sid)
                    try:
                        await self._consul.deregister_service(sid)
                        log.info("deregistered %s (removed by a reload)", sid)
                    except RegistryError as exc:
                        log.warning("deregistering %s failed: %s", sid, exc)

    async def deregister_all(self, consul: ConsulClient) -> None:
        """Remove every entry this daemon registered (shielded, bounded)."""
        with trio.CancelScope(shield=True), trio.move_on_after(DEREGISTER_TIMEOUT):
            async with self._lock:
                while self._registered:
                    sid = self._registered.pop()
                    try:
                        await consul.deregister_service(sid)
                        log.info("deregistered %s", sid)
                    except RegistryError as exc:
                        log.warning("deregistering %s failed: %s", sid, exc)
