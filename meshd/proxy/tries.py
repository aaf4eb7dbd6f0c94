"""One outbound HTTP request, tried until it gets an answer worth relaying: the trio shell
around routing, circuit breaking, retries and outlier detection.

    whole-request timeout (the route's ``timeout``)
      └─ a connection slot (circuit breaker: at once, after waiting in line, or 503 at once)
           └─ try 1..1+attempts, each under the per-try timeout until its response starts:
                pick an endpoint (balancer, minus ejected ones, avoiding those already tried)
                → pooled connection → ``Exchange`` (a 5xx the route retries is held back)
                → outcome to the outlier detector → retry? (``retry.retry_verdict`` + budget)

A try's outcome is a status or a ``Failure`` (connect failure, reset, per-try timeout). Once a
response starts towards the client it is relayed to the end (only the whole-request timeout
still applies): nothing that reached the client is ever retried. When no try got an answer,
meshd answers itself: 502 (connect failure, reset), 504 (timeouts) or 503 (circuit breaker),
with ``x-meshd-reason`` on the 503.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

import trio

from meshd.config.schema import RetryPolicy
from meshd.metrics import Metrics
from meshd.proxy.core.http1 import Framing, RequestHead, ResponseHead
from meshd.proxy.core.outlier import Failure, Outcome
from meshd.proxy.core.retry import Body, condition_met, retry_backoff, retry_verdict
from meshd.proxy.core.router import RoutePlan
from meshd.proxy.destinations import DestinationState
from meshd.proxy.exchange import BodySource, Exchange, RequestSource
from meshd.proxy.forward import (
    ClientConnection,
    ConnectFailed,
    Result,
    Unbounded,
    answer_locally,
    bounded,
    conclude,
)
from meshd.proxy.pool import ConnectionPool
from meshd.proxy.replay import ReplayBody
from meshd.registry.model import Endpoint, EndpointSet

log = logging.getLogger(__name__)

REASON_HEADER = b"x-meshd-reason"
# Failed connects that are our own doing (no certificate yet): not the endpoint's fault.
LOCAL_CONNECT_FAILURES = {"no_identity"}


@dataclass
class Call:
    """Everything one request's tries need."""

    request: RequestHead
    source: RequestSource
    conn: ClientConnection
    plan: RoutePlan
    state: DestinationState
    endpoints: EndpointSet | None  # the destination's endpoints in the view the request read
    pool: ConnectionPool
    pool_key: Callable[[Endpoint], Hashable]
    connect: Callable[[Endpoint], Awaitable[trio.abc.HalfCloseableStream]]
    upstream_head: bytes
    body: ReplayBody | None  # kept for retries/mirroring, or None (streamed only)
    rand: Callable[[], float]
    metrics: Metrics
    hash_key: str | None = None


@dataclass
class Attempt:
    """What one try came to (``outcome`` is what the outlier detector is told)."""

    endpoint: Endpoint
    exchange: Exchange | None = None
    outcome: Outcome | None = None  # None: nothing to say about the endpoint (client's fault)
    failure: ConnectFailed | None = None
    held: bool = False  # a response was held back, the retry already decided and paid for
    relayed: bool = False  # the response started towards the client: final


@dataclass
class Called:
    """How the request ended, for metrics and the access log."""

    result: Result
    endpoint: Endpoint | None
    tries: int


class Tries:
    def __init__(self, call: Call) -> None:
        self.call = call
        route = call.plan.route
        self.retries: RetryPolicy | None = route.retries if route is not None else None
        self.method = call.request.method.decode("ascii", "replace")
        self.retries_done = 0
        self.current: Exchange | None = None  # the exchange of the try in progress
        self._whole: trio.CancelScope | Unbounded | None = None

    def body_state(self) -> Body:
        if self.call.body is not None:
            return self.call.body.state
        # Not kept (the route neither retries nor mirrors): only a body-less request can be
        # sent again (on a fresh connection when a pooled one was stale).
        return Body.NONE if self.call.request.framing is Framing.NONE else Body.LOST

    async def run(self) -> Called:
        c = self.call
        timeout = c.plan.timeout
        last: Attempt | None = None
        tries = 0
        rejected = False
        with bounded(timeout) as whole:
            self._whole = whole
            if not await c.state.acquire():
                rejected = True
            else:
                try:
                    if self.retries is not None:  # the budget is a ratio of these requests
                        c.state.budget.record_request(trio.current_time())
                    avoid: list[str] = []
                    while True:
                        endpoint = c.state.pick(c.plan.candidates, c.plan.subset,
                                                trio.current_time(), c.rand, c.hash_key, avoid)
                        assert endpoint is not None  # the plan has candidates
                        tries += 1
                        last = await self._try(endpoint)
                        if not await self._again(last):
                            break
                        avoid.append(endpoint.key)
                        self.retries_done += 1
                        await trio.sleep(retry_backoff(self.retries_done - 1, c.rand()))
                finally:
                    c.state.release()
        return Called(await self._finish(whole.cancelled_caught, rejected, last, timeout),
                      last.endpoint if last is not None else None, tries)

    async def _try(self, endpoint: Endpoint) -> Attempt:
        c = self.call
        retries = self.retries
        per_try = retries.per_try_timeout if retries is not None else None
        done = Attempt(endpoint)
        c.state.begin(endpoint)
        try:
            with bounded(per_try) as scope:

                def hold(head: ResponseHead) -> bool:
                    if self._hold(head.status):
                        return True
                    scope.deadline = math.inf  # relaying: only the whole timeout applies now
                    return False

                for attempt in range(2):  # a second one only for a stale pooled connection
                    try:
                        lease = await c.pool.acquire(c.pool_key(endpoint),
                                                     lambda: c.connect(endpoint))
                    except ConnectFailed as exc:
                        done.failure = exc
                        break
                    body: BodySource = c.body.for_try() if c.body is not None else c.source
                    exchange = self.current = done.exchange = Exchange(
                        c.request, body, c.source.stream, lease.stream, c.upstream_head,
                        keep_client=c.request.keep_alive and not c.conn.draining,
                        reused_upstream=lease.reused,
                        hold=hold if retries is not None else None,
                        requests=c.source, on_switch=lambda: self._tunnelling(scope))
                    try:
                        await exchange.run()
                    finally:
                        await c.pool.release(lease, exchange.upstream_reusable,
                                             c.state.policy.idle_timeout)
                    error = exchange.upstream_error
                    if error is not None and error.pooled_dead:
                        # the server closed its idle connections (restart, drain, timeout)
                        await c.pool.discard_idle(c.pool_key(endpoint))
                    if not (error is not None and error.stale and attempt == 0
                            and self.body_state() is not Body.LOST):
                        break
                    log.debug("pooled connection to %s was stale, retrying on a new one",
                              endpoint.key)
        finally:
            c.state.end(endpoint)
        self._classify(done, scope.cancelled_caught)
        if done.outcome is not None:
            c.state.record(endpoint, done.outcome, trio.current_time(), c.endpoints)
        return done

    def _tunnelling(self, per_try: trio.CancelScope | Unbounded) -> None:
        """A 101 went to the client: the upgraded connection lasts as long as its two ends
        want, past the route's timeouts."""
        per_try.deadline = math.inf
        if self._whole is not None:
            self._whole.deadline = math.inf

    def _hold(self, status: int) -> bool:
        """Whether to hold back a response with ``status`` and retry instead (paid for now:
        once held, the response is gone)."""
        retries = self.retries
        if retries is None or status < 400 or not condition_met(status, retries.retry_on):
            return False
        verdict = retry_verdict(retries, self.retries_done, status, self.method,
                                self.body_state())
        return verdict.retry and self._spend()

    def _spend(self) -> bool:
        c = self.call
        if c.state.budget.try_spend(trio.current_time()):
            return True
        c.metrics.retry_budget_exhausted.labels(c.plan.destination).inc()
        log.debug("%s: retry budget spent, not retrying", c.plan.destination)
        return False

    @staticmethod
    def _classify(done: Attempt, timed_out: bool) -> None:
        exchange = done.exchange
        if done.failure is not None:
            if done.failure.reason not in LOCAL_CONNECT_FAILURES:
                done.outcome = Failure.CONNECT
            return
        assert exchange is not None
        if exchange.held_status:
            done.outcome, done.held = exchange.held_status, True
        elif exchange.response_started:
            done.relayed = True
            done.outcome = Failure.RESET if exchange.upstream_error else exchange.status
        elif timed_out:
            done.outcome = Failure.TIMEOUT
        elif exchange.client_error is not None:
            done.relayed = True  # final: the client is gone or sent garbage
        elif exchange.upstream_error is not None:
            done.outcome = Failure.RESET

    async def _again(self, done: Attempt) -> bool:
        """Whether to try once more after ``done``."""
        if done.relayed or done.outcome is None:
            return False
        if not done.held:
            verdict = retry_verdict(self.retries, self.retries_done, done.outcome,
                                    self.method, self.body_state())
            if not verdict.retry or not self._spend():
                return False
        c = self.call
        reason = done.outcome.value if isinstance(done.outcome, Failure) else str(done.outcome)
        c.metrics.retries.labels(c.plan.destination, reason).inc()
        log.debug("%s: retrying after %s from %s (retry %d)", c.plan.destination, reason,
                 done.endpoint.key, self.retries_done + 1)
        return True

    async def _finish(self, timed_out: bool, rejected: bool, last: Attempt | None,
                      whole: float | None) -> Result:
        c = self.call
        client, source, request, conn = c.source.stream, c.source, c.request, c.conn
        exchange = self.current
        if rejected:
            text = c.state.rejection_reason()
            keep = await answer_locally(client, source, request, conn, 503, text,
                                        [(REASON_HEADER, text.encode("ascii", "replace"))])
            return Result(503, keep, text)
        if timed_out:
            if exchange is None or not exchange.response_started:
                text = f"upstream did not answer within {whole:g}s"
                keep = await answer_locally(client, source, request, conn, 504, text)
                return Result(504, keep, text)
            return Result(exchange.status, False, "timed out while relaying the response")
        assert last is not None
        if last.failure is not None:
            text = str(last.failure)
            keep = await answer_locally(client, source, request, conn, 502, text)
            return Result(502, keep, text)
        if last.outcome is Failure.TIMEOUT:
            per_try = self.retries.per_try_timeout if self.retries else None
            text = f"upstream did not answer within {per_try:g}s (per-try timeout)"
            keep = await answer_locally(client, source, request, conn, 504, text)
            return Result(504, keep, text)
        assert last.exchange is not None
        return await conclude(last.exchange, client, source, request, conn)
