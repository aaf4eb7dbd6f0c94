"""Reloading ``meshd.toml`` in a running daemon (SIGHUP, i.e. ``systemctl reload meshd``).

A reload never half-applies and never pretends. The new file is validated whole; an invalid file
changes nothing. Of a valid file's changes, these are put in force live:

- health checks (kind, path, interval, timeout): the service is registered again (its TTL
  follows the interval) and its reporter restarts;
- services added or removed: registered (after certificates for the host's services are asked
  with the node certificate: the join token is for joining only) or deregistered, with their
  reporters;
- upstreams added, removed or changed: their outbound listeners opened, or closed and drained,
  while every other listener serves on;
- ``drain_timeout`` (the next drain reads it).

What the daemon could not do (the CA refused the new service's certificate, a port in use) is
left out of the configuration in force and reported with the reason (``ReloadPlan.failed``).
Everything else (node, address, ports, trust domain, registry, CA, state directory, a running
service's own keys, a service in permissive mTLS mode) is reported, key by key with the reason,
as needing a restart, and the running daemon keeps its current value. The last reload's outcome
is in ``/v1/state`` (``reload_report``). Routes are not in meshd.toml at all:
they come from the registry and are applied as they change there. Nor is the log level (the
``--log-level`` option or ``MESHD_LOG_LEVEL``, read at start).

``plan_reload`` is pure (two configs in, a plan out); ``reload_from_file`` is the thin shell
that reads the file, logs, tells systemd and hands the plan to the daemon.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import trio

from meshd import systemd
from meshd.admin.state import DaemonState
from meshd.config.load import load_host_config
from meshd.config.schema import HealthCheck, HostConfig, LocalService, MTLSMode, Upstream
from meshd.errors import ConfigError

log = logging.getLogger(__name__)

ABSENT = "(absent)"


@dataclass(frozen=True)
class Change:
    """One key whose value differs between the configuration in force and the file."""

    key: str
    old: str
    new: str
    note: str = ""  # why a live change could not be made (``ReloadPlan.failed``)

    def __str__(self) -> str:
        return f"{self.key}: {self.old} -> {self.new}"

    @property
    def restart_reason(self) -> str:
        """Why this key cannot change in a running meshd (for a change that needs a restart)."""
        if self.note:
            return self.note
        for prefix, reason in _RESTART_REASONS:
            if self.key == prefix or self.key.startswith(prefix + "."):
                return reason
        if self.key.startswith("services."):
            return _SERVICE_REASON
        return "read once at start"

    def to_json(self, *, restart: bool = False) -> dict[str, str]:
        data = {"key": self.key, "old": self.old, "new": self.new}
        if self.note:
            return {**data, "reason": self.note}
        return {**data, "reason": self.restart_reason} if restart else data


@dataclass(frozen=True)
class ReloadPlan:
    config: HostConfig                 # what to put in force: the running config + live changes
    applied: tuple[Change, ...]        # put in force by this reload
    needs_restart: tuple[Change, ...]  # reported only: the running value stays
    health_changed: tuple[str, ...]    # services whose health check changed
    services_added: tuple[str, ...] = ()     # registered, with a certificate from the CA
    services_removed: tuple[str, ...] = ()   # deregistered
    upstreams_added: tuple[tuple[str, str], ...] = ()    # (service, upstream): listener opened
    upstreams_removed: tuple[tuple[str, str], ...] = ()  # its listener closed and drained
    failed: tuple[Change, ...] = ()  # live changes the daemon could not make (note: why)

    @property
    def unchanged(self) -> bool:
        return not self.applied and not self.needs_restart and not self.failed


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _check(health: HealthCheck) -> str:
    if health.kind in ("http", "grpc"):
        return f"{health.kind} {health.path or '(server)'}"
    return health.kind


# How HostConfig fields are spelled in meshd.toml, where that differs from the field name.
_HOST_KEYS = {"registry_url": "registry", "inbound_port": "inbound.port",
              "admin_host": "admin.address", "admin_port": "admin.address",
              "admin_tls": "admin.tls", "admin_allowed_hosts": "admin.allowed_hosts",
              "outbound_address": "outbound.address", "egress_port": "outbound.egress_port",
              "inbound_handshake_timeout": "inbound.handshake_timeout",
              "access_log": "access_log.format"}
# connection caps (``ListenerLimits``): the table they are written in, and their keys' names
_LIMIT_TABLES = {"inbound_limits": "inbound", "outbound_limits": "outbound",
                 "admin_limits": "admin"}
_LIMIT_KEYS = {"max_connections": "max_connections",
               "max_per_source": "max_connections_per_source"}
_SECRET_KEYS = {"registry_token"}
# why a key needs a restart, by the first parts of its name in meshd.toml
_RESTART_REASONS = (
    ("node", "the node's certificate, registrations and service IDs carry its name"),
    ("address", "registrations and the inbound listener use it"),
    ("trust_domain", "every certificate and trust check is made for it"),
    ("registry", "the registry client, its watches and registrations are made at start"),
    ("registry_token", "the registry client is made at start"),
    ("ca", "identities are obtained and renewed with these settings from start"),
    ("state_dir", "certificates and the last known state are kept there"),
    ("inbound", "the inbound mTLS listener is bound at start"),
    ("outbound", "outbound listeners are bound with these settings"),
    ("admin", "the admin API is bound at start"),
    ("gateways", "a gateway's listeners, identity and registration are set up at start"),
    ("workers", "the worker processes are started at start"),
)
_PERMISSIVE_REASON = ("a service in permissive mTLS mode sets how the inbound listener tells "
                      "plaintext from TLS, which is fixed at start")
_SERVICE_REASON = ("a running service's address, port, protocol, version and mTLS mode are in its "
                   "registration and its inbound handling (remove it and add it back, or restart)")
# services are compared one by one below; the beyond-loopback reason is only words
_LIVE_HOST_FIELDS = {"services", "source", "outbound_beyond_loopback", "drain_timeout"}
_LIVE_SERVICE_FIELDS = {"name", "health", "upstreams"}  # health applies live; upstreams below


def _value(key: str, value: object) -> str:
    if key == "workers" and value is None:
        return "auto"
    return "(secret)" if key in _SECRET_KEYS else str(value)


def _host_changes(old: HostConfig, new: HostConfig) -> Iterator[Change]:
    """Every host-level key that differs, named as in meshd.toml. Compared field by field so
    that a key added to the config later is reported too, never silently ignored."""
    seen: set[str] = set()
    for f in fields(HostConfig):
        if f.name in _LIVE_HOST_FIELDS:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if is_dataclass(a) and is_dataclass(b):  # the [ca] table
            for sub in fields(a):
                sa, sb = getattr(a, sub.name), getattr(b, sub.name)
                if sa != sb:
                    table = _LIMIT_TABLES.get(f.name, f.name)
                    yield Change(f"{table}.{_LIMIT_KEYS.get(sub.name, sub.name)}", str(sa),
                                 str(sb))
            continue
        key = _HOST_KEYS.get(f.name, f.name)
        if key in seen:
            continue
        seen.add(key)
        if key == "admin.address":
            yield Change(key, f"{old.admin_host}:{old.admin_port}",
                         f"{new.admin_host}:{new.admin_port}")
        else:
            yield Change(key, _value(key, a), _value(key, b))


def _service_changes(old: LocalService, new: LocalService) -> Iterator[Change]:
    """A service's own keys that need a restart (its registration and identity)."""
    base = f"services.{old.name}"
    for f in fields(LocalService):
        if f.name in _LIVE_SERVICE_FIELDS:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a != b:
            yield Change(f"{base}.{f.name}", str(a), str(b))


def _upstream(upstream: Upstream | None) -> str:
    if upstream is None:
        return ABSENT
    return f"local_port {upstream.local_port} {upstream.protocol.value}"


def _upstream_changes(old: LocalService, new: LocalService
                      ) -> tuple[list[Change], list[str], list[str]]:
    """Upstreams removed and added (a changed one is both: its listener is replaced)."""
    ups_old = {u.name: u for u in old.upstreams}
    ups_new = {u.name: u for u in new.upstreams}
    changes: list[Change] = []
    removed: list[str] = []
    added: list[str] = []
    for name in sorted(ups_old.keys() | ups_new.keys()):
        a, b = ups_old.get(name), ups_new.get(name)
        if a == b:
            continue
        changes.append(Change(f"services.{old.name}.upstreams.{name}", _upstream(a),
                              _upstream(b)))
        if a is not None:
            removed.append(name)
        if b is not None:
            added.append(name)
    return changes, removed, added


def _health_changes(old: LocalService, new: LocalService) -> Iterator[Change]:
    base = f"services.{old.name}.health"
    if _check(old.health) != _check(new.health):
        yield Change(f"{base}.check", _check(old.health), _check(new.health))
    for key in ("interval", "timeout"):
        a, b = getattr(old.health, key), getattr(new.health, key)
        if a != b:
            yield Change(f"{base}.{key}", _seconds(a), _seconds(b))


def plan_reload(running: HostConfig, loaded: HostConfig) -> ReloadPlan:
    """Compare the configuration in force with a freshly validated file."""
    applied: list[Change] = []
    restart: list[Change] = list(_host_changes(running, loaded))
    new_by_name = {s.name: s for s in loaded.services}
    old_names = {s.name for s in running.services}
    services: list[LocalService] = []
    health_changed: list[str] = []
    removed_services: list[str] = []
    ups_added: list[tuple[str, str]] = []
    ups_removed: list[tuple[str, str]] = []
    for svc in running.services:
        new = new_by_name.get(svc.name)
        if new is None and svc.mtls is not MTLSMode.STRICT:
            restart.append(Change(f"services.{svc.name}", f"port {svc.port}", ABSENT,
                                  _PERMISSIVE_REASON))
            services.append(svc)
            continue
        if new is None:
            applied.append(Change(f"services.{svc.name}", f"port {svc.port}", ABSENT))
            removed_services.append(svc.name)
            ups_removed += [(svc.name, u.name) for u in svc.upstreams]
            continue
        restart.extend(_service_changes(svc, new))
        health = list(_health_changes(svc, new))
        if health:
            applied.extend(health)
            health_changed.append(svc.name)
            svc = dataclasses.replace(svc, health=new.health)
        changes, gone, came = _upstream_changes(svc, new)
        if changes:
            applied.extend(changes)
            ups_removed += [(svc.name, name) for name in gone]
            ups_added += [(svc.name, name) for name in came]
            svc = dataclasses.replace(svc, upstreams=new.upstreams)
        services.append(svc)
    added_services: list[str] = []
    for svc in loaded.services:
        if svc.name not in old_names and svc.mtls is not MTLSMode.STRICT:
            restart.append(Change(f"services.{svc.name}", ABSENT, f"port {svc.port}",
                                  _PERMISSIVE_REASON))
        elif svc.name not in old_names:
            applied.append(Change(f"services.{svc.name}", ABSENT, f"port {svc.port}"))
            added_services.append(svc.name)
            ups_added += [(svc.name, u.name) for u in svc.upstreams]
            services.append(svc)
    config = running
    if tuple(services) != running.services:
        config = dataclasses.replace(running, services=tuple(services))
    if running.drain_timeout != loaded.drain_timeout:
        applied.append(Change("drain_timeout", _seconds(running.drain_timeout),
                              _seconds(loaded.drain_timeout)))
        config = dataclasses.replace(config, drain_timeout=loaded.drain_timeout)
    return ReloadPlan(config, tuple(applied), tuple(restart), tuple(health_changed),
                      tuple(added_services), tuple(removed_services), tuple(ups_added),
                      tuple(ups_removed))


def without_service(config: HostConfig, name: str) -> HostConfig:
    """``config`` without local service ``name`` (an addition the daemon could not make)."""
    return without_services(config, (name,))


def without_services(config: HostConfig, names: Sequence[str]) -> HostConfig:
    """``config`` without the local services ``names``."""
    return dataclasses.replace(config, services=tuple(s for s in config.services
                                                      if s.name not in names))


def without_upstream(config: HostConfig, service: str, upstream: str) -> HostConfig:
    """``config`` without ``service``'s upstream ``upstream`` (a listener that could not be
    opened)."""
    return dataclasses.replace(config, services=tuple(
        dataclasses.replace(s, upstreams=tuple(u for u in s.upstreams if u.name != upstream))
        if s.name == service else s for s in config.services))


def reload_report(path: Path, at: float, plan: ReloadPlan | None,
                  problems: Sequence[str] = (),
                  previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``reload`` entry of ``/v1/state``: the last reload's outcome. A refused file changes
    nothing, so what an earlier reload left waiting for a restart is still waiting."""
    when = datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    if plan is None:
        return {"result": "refused", "file": str(path), "at": when, "problems": list(problems),
                "applied": [], "failed": [],
                "needs_restart": list((previous or {}).get("needs_restart", []))}
    return {"result": "unchanged" if plan.unchanged else "applied", "file": str(path),
            "at": when, "problems": [],
            "applied": [c.to_json() for c in plan.applied],
            "failed": [c.to_json() for c in plan.failed],
            "needs_restart": [c.to_json(restart=True) for c in plan.needs_restart]}


def with_failures(plan: ReloadPlan, config: HostConfig, failed: Sequence[Change]) -> ReloadPlan:
    """``plan`` as the daemon put it in force: ``config``, and ``failed`` no longer applied
    (a failed service's upstreams fail with it)."""
    gone = {c.key for c in failed}

    def failed_with(key: str) -> bool:
        return any(key == g or key.startswith(g + ".") for g in gone)

    return dataclasses.replace(
        plan, config=config, applied=tuple(c for c in plan.applied if not failed_with(c.key)),
        failed=tuple(failed))


def summary(plan: ReloadPlan) -> str:
    """A short phrase for the service status line."""
    if plan.unchanged:
        return "reloaded: no change"
    parts = []
    if plan.applied:
        parts.append(f"reload applied {len(plan.applied)} change(s)")
    if plan.failed:
        parts.append(f"COULD NOT APPLY {', '.join(c.key for c in plan.failed)}")
    if plan.needs_restart:
        keys = ", ".join(c.key for c in plan.needs_restart)
        parts.append(f"RESTART NEEDED for {keys}")
    return "; ".join(parts)


class Reloadable(Protocol):
    """What a reload needs of the running daemon (``meshd.daemon.lifetime.Daemon`` is one)."""

    config: HostConfig
    status_note: str
    state: DaemonState

    def status_line(self) -> str: ...

    async def apply_live_config(self, plan: ReloadPlan) -> ReloadPlan: ...


async def reload_from_file(daemon: Reloadable, path: Path) -> ReloadPlan | None:
    """Re-read ``path`` and apply what can be applied; None when the file was refused."""
    log.info("reloading %s", path)
    systemd.notify(reloading=True, status=f"reloading {path}")
    try:
        loaded = await trio.to_thread.run_sync(load_host_config, path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused: %s", problem)
        note = (f"reload refused: {len(exc.problems)} problem(s) in {path}, "
                "still running on the previous configuration")
        log.error("%s", note)
        daemon.status_note = note
        daemon.state.last_reload = reload_report(
            path, time.time(), None, [str(p) for p in exc.problems], daemon.state.last_reload)
        systemd.notify(ready=True, status=daemon.status_line())
        return None
    plan = plan_reload(daemon.config, loaded)
    if plan.unchanged:
        log.info("reload: %s has no change", path)
    for change in plan.needs_restart:
        log.warning("reload cannot apply %s without a restart; the running value stays "
                    "(%s: %s)", change, path, change.restart_reason)
    if plan.needs_restart:
        log.warning("reload: %d change(s) need a restart to take effect "
                    "(systemctl restart meshd): %s", len(plan.needs_restart),
                    ", ".join(c.key for c in plan.needs_restart))
    plan = await daemon.apply_live_config(plan)
    for change in plan.applied:
        log.info("reload applied %s", change)
    for change in plan.failed:
        log.error("reload could not apply %s: %s; the running value stays", change, change.note)
    daemon.status_note = "" if plan.unchanged else summary(plan)
    daemon.state.last_reload = reload_report(path, time.time(), plan)
    systemd.notify(ready=True, status=daemon.status_line())
    return plan
