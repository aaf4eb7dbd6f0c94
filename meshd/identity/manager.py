"""The host's certificates over time: the daemon-side certificate manager.

    IdentityManager.obtain     at start: renew with the node certificate on disk if it is valid
                               (a host rebooting after its join token expired), else join with
                               the token; with the CA unreachable (refusing, failing, or not
                               answering within START_CA_WAIT), serve the certificates already
                               on disk if every one is valid now and chains to the bundle on
                               disk (else wait for the CA: fail closed); renewal then goes on
                               in the background
    IdentityManager.run
      ├─ renewal loop          renew everything at the pure schedule's point (50-70% of the
      │                        lifetime), retry with backoff until expiry, warn at 20% left,
      │                        drop a service whose certificate expired (never present it)
      └─ trust loop            poll the CA's deny list every couple of seconds (its answer
                               names the roots, fetched only when they change): apply
                               revocations (open connections with a revoked peer are cut),
                               follow a root rotation; when the answer asks the holder of our
                               node certificate to renew now (``meshd ca rotate --finish``),
                               bring the renewal forward to a random point within the spread
                               it names. The request only ever causes an ordinary renewal: it
                               changes nothing that is trusted

Files (``<state_dir>/certs``, 0700, written atomically, keys 0600): the bundle first, then each
service's key and certificate, the node's last. Then ``TLSState.reload()``: new connections use
the new certificates, open ones carry on with theirs. The CA hears that the node moved to a
batch when it next authenticates with that batch's node certificate (the trust loop does, within
seconds), which is what lets ``meshd ca rotate --finish`` know the old root is no longer needed.

Time is wall-clock ``datetime`` from an injected ``clock``; sleeps go through trio, so tests drive
the whole lifetime with ``trio.testing.MockClock`` and a clock derived from it (and run the
blocking file work inline, ``run_blocking``: a worker thread would let the mock clock jump while
it writes).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from meshd.config.schema import HostConfig
from meshd.errors import CAError, ConfigError, IdentityError
from meshd.identity import files as ca_files
from meshd.identity import keys, schedule
from meshd.identity.ca_access import HTTPCA, CAAccess
from meshd.identity.ca_client import CARefusedError, DenyList, RenewAsked
from meshd.identity.certs import Identity, JoinResult, TrustBundle
from meshd.identity.tls import TLSState
from meshd.metrics import Metrics
from meshd.timestamps import format_time

log = logging.getLogger(__name__)

POLL_INTERVAL = 2.0     # deny list and roots: how soon a revocation or a new root applies
START_CA_WAIT = 1.0     # at start, with valid certificates on disk: how long the CA may take
MAX_SLEEP = 30.0        # re-read the wall clock at least this often (laptops sleep)
NODE_LABEL = "_node"


def utc_now() -> datetime:
    return datetime.now(UTC)


def cert_dir(config: HostConfig) -> Path:
    return config.state_dir / "certs"


@dataclass
class IdentityStatus:
    """What the host knows about its certificates (``/v1/state``'s ``identity``)."""

    node: Identity | None = None
    identities: dict[str, Identity] = field(default_factory=dict)
    bundle: TrustBundle | None = None
    renew_at: datetime | None = None
    retry_at: datetime | None = None
    last_renewal: datetime | None = None
    last_error: str = ""
    failures: int = 0
    denylist_version: int = -1
    denied: int = 0
    asked_at: datetime | None = None  # the CA asked to renew now: renewing at this time
    asked_before: str = ""            # ... because the node certificate predates this
    last_renewal_reason: str = ""

    def to_json(self, now: datetime) -> dict[str, Any]:
        def cert(i: Identity) -> dict[str, Any]:
            renewal = self.renew_at or schedule.renew_at(i.not_before, i.not_after, 0.5)
            return {"spiffe_id": i.spiffe_id, "serial": i.serial,
                    "not_after": format_time(i.not_after),
                    "state": schedule.state(i.not_before, i.not_after, renewal, now).value}

        return {
            "node": cert(self.node) if self.node else None,
            "certificates": {name: cert(i) for name, i in sorted(self.identities.items())},
            "roots": list(self.bundle.fingerprints()) if self.bundle else [],
            "renew_at": format_time(self.renew_at) if self.renew_at else None,
            "retry_at": format_time(self.retry_at) if self.retry_at else None,
            "last_renewal": format_time(self.last_renewal) if self.last_renewal else None,
            "last_error": self.last_error,
            "failures": self.failures,
            "denylist": {"version": self.denylist_version, "serials": self.denied},
            "renewal_asked": None if self.asked_at is None else {
                "renew_at": format_time(self.asked_at), "issued_before": self.asked_before},
            "last_renewal_reason": self.last_renewal_reason,
        }


OnChange = Callable[[TrustBundle, dict[str, Identity]], None]
RunBlocking = Callable[[Callable[[], Any]], Awaitable[Any]]


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


class IdentityManager:
    def __init__(
        self,
        *,
        directory: Path,
        trust_domain: str,
        services: Sequence[str],
        ca: CAAccess,
        metrics: Metrics | None = None,
        on_change: OnChange | None = None,
        clock: Callable[[], datetime] = utc_now,
        rand: Callable[[], float] = random.random,
        poll_interval: float = POLL_INTERVAL,
        run_blocking: RunBlocking = in_thread,
    ) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        self.services = tuple(services)
        self.ca = ca
        self.metrics = metrics
        self.status = IdentityStatus()
        self._on_change = on_change
        self._clock = clock
        self._rand = rand
        self._jitter = rand()
        self._poll_interval = poll_interval
        self._run_blocking = run_blocking
        self._warned: set[str] = set()  # serials already warned about (expiring / expired)
        self.renewed = trio.Event()      # set (and replaced) after each successful renewal
        self._wake = trio.Event()        # wakes the renewal loop when the CA asks to renew now
        self.denylist_read = trio.Event()  # set once the CA's deny list was first read
        self.denylist_tried = trio.Event()  # set once the first deny-list poll ended, either way
        # called with the serials newly revoked, after they are in force in the TLS state
        self.on_revoked: Callable[[frozenset[str]], None] = lambda serials: None

    @classmethod
    def for_config(cls, config: HostConfig, token: Callable[[], str], *,
                   metrics: Metrics | None = None, on_change: OnChange | None = None
                   ) -> IdentityManager:
        directory = cert_dir(config)
        return cls(directory=directory, trust_domain=config.trust_domain,
                   services=list(config.identities),
                   ca=HTTPCA(config, directory, token), metrics=metrics, on_change=on_change)

    # -- start ---------------------------------------------------------------------------------

    async def obtain(self) -> tuple[TrustBundle, dict[str, Identity]]:
        """Certificates for every local service, on disk and in ``status``.

        Raises CARefusedError when the CA refused both the renewal and the join (an operator is
        needed), CAError when the CA cannot be reached and the disk holds no usable
        certificates (one per service, valid now, chaining to the bundle on disk).
        """
        now = self._clock()
        node, bundle, on_disk = await self._run_blocking(self._read_disk)
        unusable = self._unusable_on_disk(bundle, on_disk, now)
        result: JoinResult | None = None
        error: Exception | None = None
        # with usable certificates on disk, a CA that does not answer soon is not waited for
        with trio.move_on_after(START_CA_WAIT if unusable is None else math.inf):
            try:
                result = await self._renew_or_join(node, now)
            except CARefusedError:
                raise
            except (CAError, ConfigError) as exc:
                error = exc
        if result is None:
            if error is None:
                error = CAError(f"the CA did not answer within {START_CA_WAIT:g}s")
            if unusable is not None or bundle is None:
                if isinstance(error, CAError) and on_disk:
                    raise CAError(f"{error} (and the certificates on disk are not usable: "
                                  f"{unusable})") from error
                raise error
            log.warning("cannot renew with the CA (%s); serving with the certificates on disk, "
                        "valid until %s; renewal goes on in the background", error,
                        format_time(min(i.not_after for i in on_disk.values())))
            self._set(bundle, on_disk, node)
            self._failed(error, now)
            return bundle, on_disk
        await self._store(result)
        self._succeeded(result, now)
        return result.bundle, dict(result.identities)

    def _unusable_on_disk(self, bundle: TrustBundle | None, on_disk: dict[str, Identity],
                          now: datetime) -> str | None:
        """Why the certificates on disk may not be served without the CA, or None (fail
        closed: one per service, of this trust domain, valid now, chaining to the bundle)."""
        if bundle is None:
            return "no trust bundle"
        missing = sorted(set(self.services) - set(on_disk))
        if missing:
            return f"no certificate for {', '.join(missing)}"
        roots = bundle.certificates()
        for service, identity in sorted(on_disk.items()):
            if identity.trust_domain != self.trust_domain:
                return f"the certificate of {service} is of trust domain {identity.trust_domain}"
            if not identity.valid_at(now):
                return (f"the certificate of {service} is not valid now (valid "
                        f"{format_time(identity.not_before)} to {format_time(identity.not_after)})")
            if not _chains_to(identity, roots):
                return f"the certificate of {service} does not chain to the trust bundle on disk"
        return None

    def _read_disk(self) -> tuple[Identity | None, TrustBundle | None, dict[str, Identity]]:
        node: Identity | None
        try:
            node = ca_files.read_node_identity(self.directory)
        except CAError:
            node = None
        try:
            bundle: TrustBundle | None = ca_files.read_bundle(self.directory, self.trust_domain)
        except CAError:
            bundle = None
        identities = {}
        for service in self.services:
            try:
                identities[service] = ca_files.read_identity(self.directory, service)
            except CAError:
                pass
        return node, bundle, identities

    async def _renew_or_join(self, node: Identity | None, now: datetime) -> JoinResult:
        """Renew with a valid node certificate; join with the token when there is none, or when
        the CA refuses the renewal (the operator may have minted a new token)."""
        if node is not None and node.valid_at(now):
            try:
                return await self.ca.renew(self.services)
            except CARefusedError as exc:
                if exc.status >= 500:
                    raise
                log.warning("the CA refused to renew with node certificate %s (%s); joining "
                            "with the token instead", node.serial, exc.reason)
        elif node is not None:
            log.warning("the node certificate expired at %s; joining with the token",
                        format_time(node.not_after))
        return await self.ca.join(self.services)

    async def claim(self, services: Sequence[str], tls: TLSState) -> None:
        """The host's services are now ``services`` (a reload added some): certificates for
        all of them, asked with the node certificate (the join token is for joining only, and
        may be used up). The CA issues for a service only if the node may claim it (the
        services its token named); it refuses with ``CARefusedError``, and nothing changes."""
        now = self._clock()
        node = self.status.node
        if node is None or not node.valid_at(now):
            raise CAError("no valid node certificate to ask the CA with")
        result = await self.ca.renew(services)
        self.services = tuple(services)
        await self._store(result)
        tls.services = self.services
        tls.reload()
        self.ca.files_changed()
        self._succeeded(result, now)
        log.info("certificates for %s from the CA (renewed with %s)", ", ".join(services),
                 node.spiffe_id)

    def release(self, services: Sequence[str], tls: TLSState) -> None:
        """Services no longer on this host (a reload removed them): no longer renewed nor
        served (their files stay on disk)."""
        self.services = tuple(s for s in self.services if s not in services)
        self.status.identities = {k: v for k, v in self.status.identities.items()
                                  if k not in services}
        tls.services = tuple(s for s in tls.services if s not in services)
        if self._on_change is not None and self.status.bundle is not None:
            self._on_change(self.status.bundle, dict(self.status.identities))

    # -- running -------------------------------------------------------------------------------

    async def run(self, tls: TLSState, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._renewal_loop, tls)
                nursery.start_soon(self._trust_loop, tls)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.ca.aclose()

    async def _renewal_loop(self, tls: TLSState) -> None:
        while True:
            anchor = self._anchor()
            now = self._clock()
            if anchor is None:  # nothing at all: keep trying to get certificates
                wake = schedule.Wakeup(self.status.retry_at or now, True)
            else:
                self.status.renew_at = schedule.renew_at(anchor.not_before, anchor.not_after,
                                                         self._jitter)
                wake = schedule.next_wakeup(
                    now=now, renewal=self.status.renew_at,
                    warn=schedule.warn_at(anchor.not_before, anchor.not_after),
                    expiry=anchor.not_after, retry_at=self.status.retry_at,
                    asked=self.status.asked_at)
            delay = (wake.at - now).total_seconds()
            if delay > 0:
                with trio.move_on_after(min(delay, MAX_SLEEP)):
                    await self._wake.wait()
                if self._wake.is_set():  # the CA asked for a renewal: plan again
                    self._wake = trio.Event()
                    continue
                if delay > MAX_SLEEP:
                    continue  # look at the wall clock again
            now = self._clock()
            self._check_expiry(tls, now)
            if wake.renew:
                await self._renew(tls)

    def _anchor(self) -> Identity | None:
        """The certificate whose lifetime drives the schedule: they are issued together, so the
        earliest to expire (the node's, or a service's left over from before)."""
        certs = [*self.status.identities.values(), *([self.status.node] if self.status.node
                                                     else [])]
        return min(certs, key=lambda i: i.not_after) if certs else None

    async def _renew(self, tls: TLSState) -> None:
        now = self._clock()
        try:
            result = await self._renew_or_join(self.status.node, now)
            await self._store(result)
            tls.reload()
        except (CAError, ConfigError, IdentityError) as exc:
            self._failed(exc, now)
            return
        self.ca.files_changed()
        reason = ("asked by the CA (node certificate issued before "
                  f"{self.status.asked_before})" if self.status.asked_at is not None
                  else "scheduled")
        self._succeeded(result, now)
        self.status.last_renewal_reason = reason
        log.info("renewed %s and %d service certificate(s) until %s, %s (next renewal around %s)",
                 result.node.spiffe_id, len(result.identities), format_time(result.node.not_after),
                 reason, format_time(self.status.renew_at) if self.status.renew_at else "?")
        renewed, self.renewed = self.renewed, trio.Event()
        renewed.set()

    def _check_expiry(self, tls: TLSState, now: datetime) -> None:
        """Warn once per certificate at 20% left; at expiry, say so and reload so the expired
        certificate leaves the TLS contexts (handshakes refuse it already)."""
        expired = False
        for name, identity in [*self.status.identities.items(),
                               *([(NODE_LABEL, self.status.node)] if self.status.node else [])]:
            key = f"{identity.serial}:{'expired' if now >= identity.not_after else 'expiring'}"
            if key in self._warned:
                continue
            if now >= identity.not_after:
                self._warned.add(key)
                expired = True
                log.error("the certificate of %s expired at %s and could not be renewed (%s); "
                          "%s", identity.spiffe_id, format_time(identity.not_after),
                          self.status.last_error or "no renewal attempted",
                          "the service is refused until a renewal succeeds"
                          if name != NODE_LABEL else "joining needs a new token")
            elif now >= schedule.warn_at(identity.not_before, identity.not_after):
                self._warned.add(key)
                log.warning("the certificate of %s expires at %s (less than 20%% of its lifetime "
                            "left) and renewal keeps failing: %s", identity.spiffe_id,
                            format_time(identity.not_after), self.status.last_error or "-")
        if expired:
            try:
                tls.reload()
            except IdentityError as exc:
                log.error("cannot reload TLS identities: %s", exc)

    async def _trust_loop(self, tls: TLSState) -> None:
        failing = False
        while True:
            try:
                node = self.status.node
                deny = await self.ca.denylist()
                self._apply_denylist(tls, deny)
                if deny.renew is not None and node is self.status.node:
                    self._renewal_asked(deny.renew)
                self.denylist_read.set()
                current = self.status.bundle
                if not deny.roots or current is None or deny.roots != set(current.fingerprints()):
                    await self._apply_bundle(tls, await self.ca.roots())
            except (CAError, IdentityError) as exc:
                if not failing:
                    log.warning("cannot read the deny list and roots from the CA (retrying "
                                "every %gs): %s", self._poll_interval, exc)
                failing = True
            else:
                if failing:
                    log.info("reading the deny list and roots from the CA again")
                failing = False
            self.denylist_tried.set()
            # +-20%: hosts started together do not poll the CA in lockstep
            await trio.sleep(self._poll_interval * (0.8 + 0.4 * self._rand()))

    def _renewal_asked(self, asked: RenewAsked) -> None:
        """The CA asked the holder of node certificate ``asked.serial`` to renew now: bring the
        renewal forward (once per certificate; the renewal itself is the ordinary one)."""
        node = self.status.node
        if node is None or node.serial != asked.serial or self.status.asked_at is not None:
            return
        now = self._clock()
        self.status.asked_at = schedule.asked_renewal_at(
            now, timedelta(seconds=asked.spread_seconds), self._rand())
        self.status.asked_before = asked.before
        log.warning("the CA asks this host to renew now (node certificate %s was issued before "
                    "%s): renewing in %.1fs", node.serial, asked.before,
                    (self.status.asked_at - now).total_seconds())
        self._wake.set()

    def _apply_denylist(self, tls: TLSState, deny: DenyList) -> None:
        if deny.version == self.status.denylist_version and deny.serials == tls.denied:
            return
        added = tls.set_denylist(deny.serials)
        self.status.denylist_version, self.status.denied = deny.version, len(deny.serials)
        if self.metrics is not None:
            self.metrics.denied_serials.set(len(deny.serials))
        if added:
            log.warning("deny list version %d: %d revoked serial(s) in force, new: %s",
                        deny.version, len(deny.serials), ", ".join(sorted(added)))
            self.on_revoked(frozenset(added))

    async def _apply_bundle(self, tls: TLSState, bundle: TrustBundle) -> None:
        current = self.status.bundle
        if current is not None and set(bundle.fingerprints()) == set(current.fingerprints()):
            return
        await self._run_blocking(lambda: ca_files.write_bundle(self.directory, bundle))
        tls.reload()
        self.ca.files_changed()
        self.status.bundle = bundle
        if self.metrics is not None:
            self.metrics.trust_roots.set(len(bundle.roots_pem))
        if self._on_change is not None:
            self._on_change(bundle, dict(self.status.identities))
        log.warning("trust bundle changed: now trusting %s", ", ".join(bundle.fingerprints()))

    # -- bookkeeping ---------------------------------------------------------------------------

    async def _store(self, result: JoinResult) -> None:
        def write() -> None:
            ca_files.write_bundle(self.directory, result.bundle)
            for identity in result.identities.values():
                ca_files.write_identity(self.directory, identity)
            ca_files.write_node_identity(self.directory, result.node)

        await self._run_blocking(write)

    def _set(self, bundle: TrustBundle, identities: dict[str, Identity],
             node: Identity | None) -> None:
        self.status.bundle, self.status.identities, self.status.node = bundle, identities, node
        if self.metrics is not None:
            for service, identity in identities.items():
                self.metrics.cert_expiry.labels(service).set(identity.not_after.timestamp())
            if node is not None:
                self.metrics.node_cert_expiry.set(node.not_after.timestamp())
            self.metrics.trust_roots.set(len(bundle.roots_pem))
        if self._on_change is not None:
            self._on_change(bundle, dict(identities))

    def _succeeded(self, result: JoinResult, now: datetime) -> None:
        self._set(result.bundle, dict(result.identities), result.node)
        self._jitter = self._rand()
        self.status.renew_at = schedule.renew_at(result.node.not_before, result.node.not_after,
                                                 self._jitter)
        self.status.retry_at, self.status.failures, self.status.last_error = None, 0, ""
        self.status.asked_at, self.status.asked_before = None, ""
        self.status.last_renewal = now
        self._warned.clear()  # (keyed by serials that are gone now)
        if self.metrics is not None:
            self.metrics.cert_renewals.labels("ok").inc()
            self.metrics.cert_renewal_failures.set(0)

    def _failed(self, exc: Exception, now: datetime) -> None:
        anchor = self._anchor()
        not_before = anchor.not_before if anchor else now
        not_after = anchor.not_after if anchor else now + timedelta(hours=1)
        delay = schedule.retry_delay(self.status.failures, self._rand(), not_before=not_before,
                                     not_after=not_after, now=now)
        self.status.failures += 1
        self.status.last_error = str(exc)
        self.status.retry_at = now + delay
        if self.metrics is not None:
            self.metrics.cert_renewals.labels("failed").inc()
            self.metrics.cert_renewal_failures.set(self.status.failures)
        log.warning("certificate renewal failed (attempt %d, next in %.1fs; certificates valid "
                    "until %s): %s", self.status.failures, delay.total_seconds(),
                    format_time(not_after) if anchor else "-", exc)


def _chains_to(identity: Identity, roots: list[x509.Certificate]) -> bool:
    """Whether ``identity``'s leaf was signed by one of ``roots``, directly or through the chain
    certificate a root rotation adds (signature and names; validity is checked apart)."""
    leaf, *chain = x509.load_pem_x509_certificates(identity.cert_pem)
    if keys.verify_issued_by(leaf, roots):
        return True
    return any(keys.verify_issued_by(leaf, [c]) and keys.verify_issued_by(c, roots)
               for c in chain)
