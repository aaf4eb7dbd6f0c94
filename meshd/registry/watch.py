"""Blocking-query watchers (one per destination in use, one for the mesh route table) and the
registry heartbeat.

Each watcher long-polls the registry, turns answers into immutable values with pure code, and
hands them to a callback. When the registry is unreachable it backs off with jitter and the last
known value stays in force; ``WatchStatus`` records how stale that value is.

Staleness is measured from the last successful contact with the registry, not from the last
answer of a long poll (which may rightly take a minute when nothing changes): ``heartbeat`` asks
the registry a cheap question (``/v1/status/leader``) every ``HEARTBEAT_INTERVAL`` seconds with a
``HEARTBEAT_TIMEOUT`` deadline and records the answer in ``RegistryContact``. An open long poll on a
registry that answers the heartbeat means "nothing changed": the watch's view is current as of
the last contact. A registry that accepts connections and never answers is stale
``STALE_AFTER`` seconds after its last answer. When the heartbeat loses contact it cuts the open
long polls short (a hung registry would hold them for their whole ``wait``), and when contact
returns it cuts the watchers' backoff short so they resync at once.

``WatchStatus`` and ``RegistryContact`` are pure (they take ``now``); the tasks here are the shell.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from meshd.backoff import backoff_delay
from meshd.errors import RegistryError
from meshd.registry.config_store import ROUTES_KEY, Accepted, Refused
from meshd.registry.consul import Blocking, ConsulClient, KVEntry, next_index
from meshd.registry.model import EndpointSet, diff_endpoints, endpoints_from_health_connect

log = logging.getLogger(__name__)

DEFAULT_WAIT = 60.0
WATCH_BACKOFF_CAP = 5.0  # retry a lost registry every 2.5-5 s: resync soon after it returns
MIN_LOOP_INTERVAL = 0.05  # never spin faster than this, whatever the registry answers
HEARTBEAT_INTERVAL = 1.0  # how often the registry is asked whether it is there
HEARTBEAT_TIMEOUT = 1.5   # an answer slower than this counts as no answer
STALE_AFTER = 3.0         # no contact for this long: every view from the registry is stale


@dataclass
class RegistryContact:
    """When this meshd last heard from the registry (monotonic seconds). Pure."""

    last_contact: float | None = None
    failing_since: float | None = None
    last_error: str = ""
    stale_after: float = STALE_AFTER

    def answered(self, now: float) -> bool:
        """Record an answer; True when this ends an outage (contact regained)."""
        regained = self.failing_since is not None
        self.last_contact, self.failing_since, self.last_error = now, None, ""
        return regained

    def failed(self, now: float, error: str) -> bool:
        """Record a failed or unanswered question; True when this starts an outage."""
        lost = self.failing_since is None
        if lost:
            self.failing_since = now
        self.last_error = error
        return lost

    def stale(self, now: float) -> bool:
        return self.last_contact is None or now - self.last_contact > self.stale_after

    @property
    def healthy(self) -> bool:
        return self.last_contact is not None and self.failing_since is None


@dataclass
class WatchStatus:
    """Health of one watcher, for ``/v1/state`` and the staleness gauge (monotonic seconds).

    ``source``: where the value in force came from: ``registry``, ``disk`` (the last known
    state a previous run kept, loaded at start before the registry answered) or ``none``.
    ``known_at``: when a value from disk was last known current (its save time), else None."""

    name: str
    last_success: float | None = None
    failing_since: float | None = None
    last_error: str = ""
    index: int = 0
    source: str = "none"
    known_at: float | None = None
    created: float = 0.0

    def succeeded(self, now: float, index: int) -> None:
        if self.failing_since is not None:
            log.info("registry watch %s recovered", self.name)
        self.last_success = now
        self.failing_since = None
        self.last_error = ""
        self.index = index
        self.source = "registry"

    def failed(self, now: float, error: str) -> None:
        if self.failing_since is None:
            self.failing_since = now
            log.warning("registry watch %s failing, keeping last known state: %s",
                        self.name, error)
        self.last_error = error

    def loaded_from_disk(self, known_at: float, index: int) -> None:
        """The value in force is the last known one from disk, current as of ``known_at``."""
        self.source, self.known_at, self.index = "disk", known_at, index

    def current_as_of(self, last_contact: float | None = None) -> float | None:
        """When the value in force was last known to match the registry: while the watch's long
        poll is open and the registry answers (``last_contact``), as of that contact."""
        if self.last_success is None:
            return self.known_at
        if self.failing_since is None and last_contact is not None:
            return max(self.last_success, last_contact)
        return self.last_success

    def stale(self, now: float, last_contact: float | None = None,
              stale_after: float = STALE_AFTER) -> bool:
        """Whether the value in force may be out of date: never read from the registry in this
        run, the watch failing, or (when the heartbeat's ``last_contact`` is given) no
        contact with the registry for ``stale_after`` seconds."""
        if self.last_success is None or self.failing_since is not None:
            return True
        if last_contact is None:
            return False
        as_of = self.current_as_of(last_contact)
        return as_of is None or now - as_of > stale_after

    def staleness(self, now: float, last_contact: float | None = None,
                  stale_after: float = STALE_AFTER) -> float:
        """0 while the watch is current, else seconds since the value in force was last known
        current (since the watch began, when there never was one)."""
        if not self.stale(now, last_contact, stale_after):
            return 0.0
        since = self.current_as_of(last_contact)
        if since is None:
            since = self.failing_since if self.failing_since is not None else self.created
        return max(0.0, now - since)


class ContactSignal:
    """The heartbeat's verdict, as trio events the watchers wait on: ``changed()`` is set (and
    replaced) each time contact is lost or regained."""

    def __init__(self, contact: RegistryContact) -> None:
        self.contact = contact
        self.generation = 0  # how many changes so far
        self._changed = trio.Event()

    def changed(self) -> trio.Event:
        return self._changed

    def announce(self) -> None:
        self.generation += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()


async def heartbeat(
    client: ConsulClient, signal: ContactSignal, *,
    interval: float = HEARTBEAT_INTERVAL, answer_within: float = HEARTBEAT_TIMEOUT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ask the registry ``/v1/status/leader`` every ``interval`` seconds (at most
    ``answer_within`` seconds each), record the outcome in ``signal.contact``, log each
    transition once and wake the watchers on it. A registry without a leader (real Consul
    that lost its quorum) counts as not answering."""
    contact = signal.contact
    task_status.started()
    while True:
        error = ""
        with trio.move_on_after(answer_within) as scope:
            try:
                if not await client.leader():
                    error = f"registry {client.base_url} has no leader"
            except RegistryError as exc:
                error = str(exc)
        if scope.cancelled_caught:
            error = f"registry {client.base_url} did not answer within {answer_within:g}s"
        now = trio.current_time()
        if not error:
            down_since = contact.failing_since
            if contact.answered(now):
                log.warning("registry %s answers again (after %.1fs without contact): "
                            "resyncing", client.base_url, now - (down_since or now))
                signal.announce()
        elif contact.failed(now, error):
            log.warning("registry %s not answering: serving the last known state (marked "
                        "stale) until it does: %s", client.base_url, error)
            signal.announce()
        await trio.sleep(interval)


async def long_poll(
    status: WatchStatus,
    fetch: Callable[[int], Awaitable[Blocking]],
    on_answer: Callable[[Blocking], None],
    signal: ContactSignal | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The one blocking-query loop: ``fetch(index)`` until cancelled, ``on_answer`` for each
    answer, backoff with jitter while the registry fails (the last value stays in force).
    ``task_status.started()`` fires after the first successful answer.

    With a heartbeat ``signal``, each change of contact cuts short what the loop is doing: a
    long poll open when contact is lost (a hung registry would hold it for its whole wait)
    counts as failed, and the backoff after a failure ends when contact returns."""
    index = 0
    attempt = 0
    started = False
    step = trio.CancelScope()
    handled = signal.generation if signal is not None else 0  # changes already acted on

    def begin_step() -> trio.CancelScope:
        scope = trio.CancelScope()
        if signal is not None and signal.generation != handled:
            scope.cancel()  # a change came while no step was running
        return scope

    async def follow_contact() -> None:
        assert signal is not None
        while True:
            await signal.changed().wait()
            step.cancel()

    async with trio.open_nursery() as nursery:
        if signal is not None:
            nursery.start_soon(follow_contact)
        while True:
            answer: Blocking | None = None
            error = ""
            with begin_step() as step:
                try:
                    answer = await fetch(index)
                except RegistryError as exc:
                    error = str(exc)
            if answer is None:
                if not error:  # cut short by the heartbeat
                    assert signal is not None
                    handled = signal.generation
                    if signal.contact.healthy:
                        attempt = 0  # contact regained: read again at once
                        index = 0
                        continue
                    error = f"registry not answering: {signal.contact.last_error}"
                status.failed(trio.current_time(), error)
                with begin_step() as step:
                    await trio.sleep(backoff_delay(attempt, random.random(),
                                                   cap=WATCH_BACKOFF_CAP))
                if step.cancelled_caught and signal is not None:
                    handled = signal.generation  # contact regained (or lost): retry now
                attempt += 1
                # resync with a plain read once the registry answers again: blocking on the old
                # index could hold the first answer (and the stale view) for a whole `wait`
                index = 0
                continue
            attempt = 0
            status.succeeded(trio.current_time(), answer.index)
            on_answer(answer)
            if not started:
                task_status.started()
                started = True
            index = next_index(index, answer.index)
            await trio.sleep(MIN_LOOP_INTERVAL)


async def watch_endpoints(
    client: ConsulClient,
    service: str,
    on_update: Callable[[EndpointSet], None],
    status: WatchStatus,
    signal: ContactSignal | None = None,
    *,
    wait: float = DEFAULT_WAIT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Watch ``/v1/health/connect/<service>``; call ``on_update`` with each changed snapshot."""
    current: EndpointSet | None = None

    def on_answer(answer: Blocking) -> None:
        nonlocal current
        endpoints = endpoints_from_health_connect(service, answer.data)
        if current is not None and current.endpoints == endpoints:
            return
        if current is not None:
            change = diff_endpoints(current.endpoints, endpoints)
            log.info("endpoints of %s: +%d -%d ~%d", service, len(change.added),
                     len(change.removed), len(change.changed))
        current = EndpointSet(service, endpoints, answer.index, trio.current_time())
        on_update(current)

    async def fetch(index: int) -> Blocking:
        return await client.health_connect(service, index=index, wait=wait)

    await long_poll(status, fetch, on_answer, signal, task_status=task_status)


async def watch_routes(
    client: ConsulClient,
    judge: Callable[[bytes | None], Accepted | Refused],
    on_update: Callable[[Accepted], None],
    on_rejected: Callable[[Refused], None],
    status: WatchStatus,
    signal: ContactSignal | None = None,
    *,
    key: str = ROUTES_KEY,
    wait: float = DEFAULT_WAIT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Watch the route table key. What the registry holds is judged by ``judge`` (the daemon's
    ``judge_stored`` with its trust bundle, deny list and the signed table in force): a verified
    table to apply (``on_update``), or a refusal (``on_rejected``: missing, empty, invalid,
    unsigned, unknown or revoked signer, replay...) and the table in force stays."""
    seen_modify: int | None = -1

    def on_answer(answer: Blocking) -> None:
        nonlocal seen_modify
        entry: KVEntry | None = answer.data
        modify = entry.modify_index if entry is not None else None
        if modify == seen_modify:
            return
        seen_modify = modify
        judged = judge(entry.value if entry is not None else None)
        if isinstance(judged, Refused):
            on_rejected(judged)
        else:
            on_update(judged)

    async def fetch(index: int) -> Blocking:
        return await client.kv_get(key, index=index, wait=wait)

    await long_poll(status, fetch, on_answer, signal, task_status=task_status)
