"""Blocking-query watchers: one per destination in use, one for the mesh route table.

Each watcher long-polls the registry, turns answers into immutable values with pure code, and
hands them to a callback. When the registry is unreachable it backs off with jitter and the last
known value stays in force; ``WatchStatus`` records how stale that value is."""

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


@dataclass
class WatchStatus:
    """Health of one watcher, for ``/v1/state`` and the staleness gauge (monotonic seconds)."""

    name: str
    last_success: float | None = None
    failing_since: float | None = None
    last_error: str = ""
    index: int = 0

    def succeeded(self, now: float, index: int) -> None:
        if self.failing_since is not None:
            log.info("registry watch %s recovered", self.name)
        self.last_success = now
        self.failing_since = None
        self.last_error = ""
        self.index = index

    def failed(self, now: float, error: str) -> None:
        if self.failing_since is None:
            self.failing_since = now
            log.warning("registry watch %s failing, keeping last known state: %s",
                        self.name, error)
        self.last_error = error

    def staleness(self, now: float) -> float:
        """0 while the watch is healthy, else seconds since its last good answer (or since it
        began failing, when it never had one)."""
        if self.failing_since is None:
            return 0.0
        since = self.last_success if self.last_success is not None else self.failing_since
        return max(0.0, now - since)


async def long_poll(
    status: WatchStatus,
    fetch: Callable[[int], Awaitable[Blocking]],
    on_answer: Callable[[Blocking], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The one blocking-query loop: ``fetch(index)`` until cancelled, ``on_answer`` for each
    answer, backoff with jitter while the registry fails (the last value stays in force).
    ``task_status.started()`` fires after the first successful answer."""
    index = 0
    attempt = 0
    started = False
    while True:
        try:
            answer = await fetch(index)
        except RegistryError as exc:
            status.failed(trio.current_time(), str(exc))
            await trio.sleep(backoff_delay(attempt, random.random(), cap=WATCH_BACKOFF_CAP))
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

    await long_poll(status, fetch, on_answer, task_status=task_status)


async def watch_routes(
    client: ConsulClient,
    judge: Callable[[bytes | None], Accepted | Refused],
    on_update: Callable[[Accepted], None],
    on_rejected: Callable[[Refused], None],
    status: WatchStatus,
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

    await long_poll(status, fetch, on_answer, task_status=task_status)
