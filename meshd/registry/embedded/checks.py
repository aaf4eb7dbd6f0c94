"""The registry runs the agent's HTTP and TCP checks itself, at their interval, as a Consul agent
does (docs/consul-api.md §5.4). A trio shell around ``check_status``.

One task per check, in a nursery owned by ``CheckRunner.run``. Whenever a write touches an
interval check the runner reconciles that check: a task whose check went away or was re-defined is
cancelled, a new check gets a task. A task first waits a random delay within one interval (the
check stays critical with an empty output until then, unless registered with a status), then
probes every interval; each
probe is bounded by the check's ``Timeout`` (10 s by default). Results pass through the check's
success/failure thresholds and are committed like any other write.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import trio

from meshd.registry.embedded.check_status import StatusGate, http_status
from meshd.registry.embedded.state import RegistryState
from meshd.registry.embedded.store.agent_writes import INTERVAL_TYPES
from meshd.registry.embedded.store.records import CRITICAL, PASSING, Check, Mutation, Op

log = logging.getLogger(__name__)

MIN_INTERVAL = 1.0  # smaller intervals are raised to this, silently (as Consul does)
USER_AGENT = "Consul Health Check"
Commit = Callable[[Callable[[RegistryState, float], Mutation]], Awaitable[Mutation]]


@dataclass(frozen=True)
class CheckSpec:
    """What a running task was started with; a change restarts the task."""

    key: str
    type: str
    interval: float
    timeout: float
    output_max: int
    definition: dict[str, Any] = field(hash=False)

    @classmethod
    def of(cls, check: Check, min_interval: float) -> CheckSpec:
        return cls(check.key, check.type, max(check.interval, min_interval), check.timeout,
                   check.output_max_size, dict(check.definition))


async def probe_tcp(address: str, limit: float) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        with trio.fail_after(limit):
            stream = await trio.open_tcp_stream(host, int(port))
        await stream.aclose()
    except trio.TooSlowError:
        return CRITICAL, f"dial tcp {address}: i/o timeout"
    except (OSError, ValueError) as exc:
        return CRITICAL, f"dial tcp {address}: {exc}"
    return PASSING, f"TCP connect {address}: Success"


async def probe_http(client: httpx.AsyncClient, spec: CheckSpec) -> tuple[str, str]:
    d = spec.definition
    url, method = d["HTTP"], d.get("Method") or "GET"
    headers = {"User-Agent": USER_AGENT, "Accept": "text/plain, text/*, */*"}
    for name, values in (d.get("Header") or {}).items():
        if values:
            headers[name] = values[-1]
    try:
        with trio.fail_after(spec.timeout):
            async with client.stream(method, url, headers=headers,
                                     content=(d.get("Body") or "").encode() or None) as response:
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > spec.output_max:
                        break
    except trio.TooSlowError:
        return CRITICAL, f'{method} "{url}": timed out after {spec.timeout:g}s'
    except httpx.HTTPError as exc:
        return CRITICAL, f'{method} "{url}": {exc}'
    text = body[:spec.output_max + 1].decode(errors="replace")
    return (http_status(response.status_code),
            f"HTTP {method} {url}: {response.status_code} {response.reason_phrase} "
            f"Output: {text}")


def _result(check_id: str, status: str, output: str, definition: dict[str, Any],
            state: RegistryState, now: float) -> Mutation:
    return state.plan_check_result(check_id, status, output, definition)


class CheckRunner:
    def __init__(self, state: RegistryState, commit: Commit, *,
                 min_interval: float = MIN_INTERVAL) -> None:
        self.state = state
        self.commit = commit
        self.min_interval = min_interval
        self._tasks: dict[str, tuple[CheckSpec, trio.CancelScope]] = {}
        self._dirty: set[str] = set()
        self._changed = trio.Event()

    def checks_changed(self, ops: Iterable[Op]) -> None:
        """Note the checks a committed write touched; only interval checks matter."""
        for op in ops:
            if op.table != "check":
                continue
            new = op.value
            if op.key in self._tasks or (isinstance(new, Check) and new.type in INTERVAL_TYPES):
                self._dirty.add(op.key)
        if self._dirty:
            self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._dirty.update(self.state.checks)  # everything, once, at start
            task_status.started()
            while True:
                dirty, self._dirty = self._dirty, set()
                for key in dirty:
                    self._reconcile(nursery, key)
                await self._changed.wait()
                self._changed = trio.Event()

    def _reconcile(self, nursery: trio.Nursery, key: str) -> None:
        check = self.state.checks.get(key)
        wanted = (CheckSpec.of(check, self.min_interval) if check is not None and check.agent
                  and check.type in INTERVAL_TYPES else None)
        running = self._tasks.get(key)
        if running is not None and running[0] != wanted:
            running[1].cancel()
            del self._tasks[key]
        if wanted is not None and key not in self._tasks:
            scope = trio.CancelScope()
            self._tasks[key] = (wanted, scope)
            nursery.start_soon(self._run_check, wanted, scope)

    async def _run_check(self, spec: CheckSpec, scope: trio.CancelScope) -> None:
        definition = spec.definition
        gate = StatusGate(int(definition.get("SuccessBeforePassing", 0)),
                          int(definition.get("FailuresBeforeWarning", 0)),
                          int(definition.get("FailuresBeforeCritical", 0)))
        verify = not definition.get("TLSSkipVerify", False)
        with scope:
            async with httpx.AsyncClient(verify=verify, trust_env=False,
                                         follow_redirects=not definition.get("DisableRedirects")
                                         ) as client:
                await trio.sleep(random.uniform(0, spec.interval))
                while True:
                    started = trio.current_time()
                    if spec.type == "tcp":
                        status, output = await probe_tcp(definition["TCP"], spec.timeout)
                    else:
                        status, output = await probe_http(client, spec)
                    decided = gate.record(status)
                    if decided is not None:
                        await self.commit(partial(_result, spec.key, decided, output,
                                                  definition))
                    await trio.sleep_until(started + spec.interval)
