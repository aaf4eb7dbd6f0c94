"""The one forwarding path of an HTTP request, inbound and outbound: its tries, until one gets
an answer worth relaying, else meshd's own answer. The trio shell of ``core.attempt``.

    whole-request timeout (the route's ``timeout``; inbound: none)
      └─ a connection slot (outbound: the circuit breaker; at once, after waiting, or 503)
           └─ try 1..1+attempts (inbound: a route without retries, one try), each under the
              per-try timeout until its response starts:
                an endpoint (outbound: the balancer's, minus ejected ones and those tried;
                inbound: the local app)
                → pooled connection → ``Exchange`` (a 5xx the route retries is held back)
                  (a pooled connection found stale: once more on a new one, same try)
                → ``TryEnd`` → the outlier detector (outbound) → ``Step``: retry (+ budget)?
      → ``Finish``: relayed, or meshd answers 503 (nothing reached an app: no connection,
        the circuit breaker), 502 (a reset or garbage after the request went out) or 504
        (timeouts), each with ``x-meshd-error`` (a code) and ``x-meshd-reason`` (words)

Outbound, what never reached an app is retried on up to 2 endpoints not tried yet, whatever the
route declares (``core.retry``), including a peer meshd's 503 saying its app refused the
connection (held back like a retried 5xx, and told to outlier detection as a connect failure;
its 502 ``app-reset`` counts as a reset);
each try goes to the first tier of the plan (subset, failover subsets, locality) with an
endpoint not ejected and not yet tried (``core.router.usable``). Inbound drops
``x-meshd-error`` and ``x-meshd-reason`` from its app's responses: only meshd says them.

Once a response starts towards the client it is relayed to the end (only the whole-request
timeout still applies): nothing that reached the client is ever retried.

What happens after each exchange, try and request is decided in ``meshd.proxy.core.attempt``;
this module connects, runs exchanges, gives connections back and answers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import KW_ONLY, dataclass, field, replace

import trio

from meshd.config.schema import RetryPolicy
from meshd.metrics import Metrics
from meshd.proxy.core.attempt import (
    ERROR_HEADER,
    REASON_HEADER,
    Finish,
    Step,
    TryEnd,
    classify,
    connect_failed,
    error_code,
    finish,
    holds,
    holds_grpc,
    next_step,
    outlier_outcome,
    peer_failure,
)
from meshd.proxy.core.grpc import grpc_status_of, http_equivalent
from meshd.proxy.core.http1 import Framing, Header, ProtocolError, RequestHead, ResponseHead
from meshd.proxy.core.http1_write import simple_response
from meshd.proxy.core.outlier import Failure, Outcome
from meshd.proxy.core.retry import Body, retry_backoff, route_retries
from meshd.proxy.core.router import RoutePlan, Tier
from meshd.proxy.destinations import DestinationState
from meshd.proxy.exchange import (
    STREAM_ERRORS,
    BodySource,
    Exchange,
    RequestSource,
    UpstreamFailed,
)
from meshd.proxy.forward import ClientConnection, answer_locally, discard_body
from meshd.proxy.h2conn import H2Pool, H2Request
from meshd.proxy.pool import ConnectFailed, ConnectionPool, Connector
from meshd.proxy.relay import H1Sink, H1Upstream, MessageExchange
from meshd.proxy.replay import ReplayBody
from meshd.registry.model import Endpoint, EndpointSet

log = logging.getLogger(__name__)

__all__ = ["ERROR_HEADER", "REASON_HEADER", "Attempts", "Destination", "Result"]
# meshd's own headers: an app's response never carries them past its meshd
OWN_HEADERS = (ERROR_HEADER, REASON_HEADER)

# Members read on every request, as module names: in Python 3.11 reading one through its class
# (``Step.FINISH``) costs about 0.1 µs, a module name a tenth of that.
_STALE, _FINISH, _RELAYED = TryEnd.STALE, Step.FINISH, Finish.RELAYED
_ANSWERED = TryEnd.ANSWERED
_NO_BODY, _LOST, _NO_FRAMING = Body.NONE, Body.LOST, Framing.NONE


def bounded(timeout: float | None) -> trio.CancelScope | Unbounded:
    """A cancel scope for ``timeout`` seconds, or (None) a stand-in that never cancels:
    entering a real scope costs a few microseconds per request even without a deadline."""
    return trio.move_on_after(timeout) if timeout is not None else UNBOUNDED


class Unbounded:
    """Used like a ``CancelScope`` with no deadline, at no cost (one instance, ``UNBOUNDED``:
    it keeps no state)."""

    cancelled_caught: bool = False

    @property
    def deadline(self) -> float:
        return math.inf

    @deadline.setter
    def deadline(self, value: float) -> None:
        if value != math.inf:
            raise AssertionError("an unbounded scope has no deadline to set")

    def __enter__(self) -> Unbounded:
        return self

    def __exit__(self, *exc_info: object) -> bool:
        return self.cancelled_caught  # as a scope swallows its own cancellation: never here


UNBOUNDED = Unbounded()


@dataclass(slots=True)  # a record returned once per request: not frozen, which costs ~1 µs
class Result:
    """How a proxied request ended: the status the client got (0: none, connection cut), whether
    its connection may carry another request, why meshd answered itself, if it did, and the
    body bytes of the last exchange with an upstream: sent to it, and relayed to the client
    (meshd's own answers count none). Metrics and access logs read the bytes here."""

    status: int
    keep: bool
    detail: str = ""
    code: str = ""  # the ``x-meshd-error`` of meshd's own answer
    grpc_status: int | None = None  # a gRPC call's outcome, when it got one
    request_bytes: int = 0  # request body bytes that went upstream (the last try's)
    response_bytes: int = 0  # response body bytes relayed to the client


@dataclass(slots=True, kw_only=True, eq=False)
class Destination:
    """What the tries of an outbound request need of its destination: the route's plan, the
    live state (balancer, circuit breaker, in-flight counts, outlier detector, retry budget),
    and how to reach an endpoint."""

    plan: RoutePlan
    state: DestinationState
    endpoints: EndpointSet | None  # the destination's endpoints in the view the request read
    pool_key: Callable[[Endpoint], Hashable]
    connect: Callable[[Endpoint], Awaitable[trio.abc.HalfCloseableStream]]
    rand: Callable[[], float]
    metrics: Metrics
    hash_key: str | None = None

    def pick(self, avoid: tuple[str, ...]) -> tuple[Endpoint, Tier]:
        picked = self.state.pick(self.plan.tiers, trio.current_time(), self.rand,
                                 self.hash_key, avoid)
        assert picked is not None  # the plan has candidates
        return picked

    def fresh_left(self, tried: tuple[str, ...]) -> bool:
        return self.state.fresh_left(self.plan.tiers, trio.current_time(), tried)

    def spend(self) -> bool:
        """Take a retry from the budget; False (counted) when it is spent."""
        if self.state.budget.try_spend(trio.current_time()):
            return True
        self.metrics.retry_budget_exhausted.labels(self.plan.destination).inc()
        log.debug("%s: retry budget spent, not retrying", self.plan.destination)
        return False

    def count_retry(self, outcome: Outcome, endpoint: Endpoint, retry: int,
                    peer: str = "") -> None:
        reason = peer or (outcome.value if isinstance(outcome, Failure) else str(outcome))
        self.metrics.retries.labels(self.plan.destination, reason).inc()
        log.debug("%s: retrying after %s from %s (retry %d)", self.plan.destination, reason,
                  endpoint.key, retry)


@dataclass(slots=True, eq=False)
class Attempts:
    """One request forwarded (the module doc). Inbound gives the local app's pool ``key`` and
    ``connect``; outbound its ``destination``. ``connect`` raises ``ConnectFailed``. ``body``
    keeps the request body for retries (None: streamed only). ``drop_response``: header names
    removed from the upstream's responses; ``edit_response``: the route's edits of their
    headers. After ``run``: ``tries`` made, the last
    ``endpoint`` tried and its ``tier`` (outbound)."""

    request: RequestHead
    source: RequestSource | H2Request
    conn: ClientConnection
    _: KW_ONLY
    pool: ConnectionPool
    upstream_head: bytes  # HTTP/1.1 upstreams: the request head to send
    timeout: float | None  # the whole request's
    # HTTP/2 upstreams: the pool of multiplexed connections and the request's header list
    h2_pool: H2Pool | None = None
    upstream_fields: list[Header] | None = None
    grpc: bool = False  # a gRPC call: its status decides retries and outlier outcomes
    key: Hashable = None
    connect: Connector | None = None
    destination: Destination | None = None
    body: ReplayBody | None = None
    drop_response: tuple[bytes, ...] = ()
    edit_response: Callable[[list[Header]], list[Header]] | None = None  # route's header edits
    # what the tries came to, so far
    tries: int = field(default=0, init=False)
    retries_done: int = field(default=0, init=False)
    endpoint: Endpoint | None = field(default=None, init=False)  # of the latest try
    tier: Tier | None = field(default=None, init=False)  # of the latest try
    # latest try: what the peer meshd's answer says happened to its app (code, failure)
    peer: tuple[str, Failure] | None = field(default=None, init=False)
    tried: tuple[str, ...] = field(default=(), init=False)  # failed: avoided by the next try
    exchange: Exchange | MessageExchange | None = field(default=None, init=False)  # latest
    failure: ConnectFailed | None = field(default=None, init=False)  # the latest one
    end: TryEnd | None = field(default=None, init=False)  # of the latest try
    retries: RetryPolicy | None = field(init=False)  # the route's
    method: str = field(init=False)  # for retry decisions
    _whole: trio.CancelScope | Unbounded = field(default=UNBOUNDED, init=False)
    _per_try: trio.CancelScope | Unbounded = field(default=UNBOUNDED, init=False)

    def __post_init__(self) -> None:
        dest = self.destination
        route = dest.plan.route if dest is not None else None
        self.retries = (route_retries(route.retries if route is not None else None)
                        if dest is not None else None)
        self.method = (self.request.method.decode("ascii", "replace")
                       if self.retries is not None else "")

    def body_state(self) -> Body:
        if self.body is not None:
            return self.body.state
        # Not kept (the route neither retries nor mirrors): only a body-less request can be
        # sent again (on a fresh connection when a pooled one was stale).
        return _NO_BODY if self.request.framing is _NO_FRAMING else _LOST

    async def run(self) -> Result:
        """Try until a try ends the request; then relay its end or answer (module doc)."""
        dest = self.destination
        rejected = False
        with bounded(self.timeout) as whole:
            self._whole = whole
            if dest is not None and not await dest.state.acquire():
                rejected = True
            else:
                try:
                    if dest is not None and self.retries is not None:  # a ratio of these
                        dest.state.budget.record_request(trio.current_time())
                    while True:
                        self.tries += 1
                        if dest is None:  # the local app
                            assert self.connect is not None
                            self.end = await self._connections(self.key, self.connect)
                        else:
                            self.end = await self._try_endpoint(dest)
                        if not self._again(self.end):
                            break
                        assert dest is not None
                        await trio.sleep(retry_backoff(self.retries_done - 1, dest.rand()))
                finally:
                    if dest is not None:
                        dest.state.release()
        how = finish(self.end, self.exchange, rejected=rejected,
                     timed_out=whole.cancelled_caught)
        exchange = self.exchange
        if how is _RELAYED:
            assert exchange is not None
            grpc = exchange.grpc_status if isinstance(exchange, MessageExchange) else None
            return Result(exchange.status, exchange.client_reusable, grpc_status=grpc,
                          request_bytes=exchange.request_bytes,
                          response_bytes=exchange.response_bytes)
        result = await self._answer(how)
        if exchange is None:
            return result
        return replace(result, request_bytes=exchange.request_bytes,
                       response_bytes=exchange.response_bytes)

    def _again(self, end: TryEnd) -> bool:
        """After a try: its outcome to the outlier detector, and whether to try again (a
        retry counted and, unless paid for already, taken from the budget)."""
        dest, endpoint, exchange = self.destination, self.endpoint, self.exchange
        status = (exchange.held_status or exchange.status) if exchange is not None else 0
        if isinstance(exchange, MessageExchange) and exchange.grpc_status is not None:
            status = http_equivalent(exchange.grpc_status)  # a failed call is still a 200
        outcome = outlier_outcome(end, status, self.peer[1] if self.peer is not None else None)
        if dest is not None and outcome is not None and endpoint is not None:
            dest.state.record(endpoint, outcome, trio.current_time(), dest.endpoints)
        step = next_step(end, outcome, self.retries, self.retries_done, self.method,
                         self.body_state(),
                         fresh=end is not _ANSWERED and self._fresh())
        if step is _FINISH:
            return False
        assert dest is not None and endpoint is not None and outcome is not None
        if step is Step.RETRY and not dest.spend():
            return False
        self.retries_done += 1
        dest.count_retry(outcome, endpoint, self.retries_done,
                         self.peer[0] if self.peer is not None else "")
        self.tried = (*self.tried, endpoint.key)
        return True

    async def _try_endpoint(self, dest: Destination) -> TryEnd:
        """One try of an outbound request: an endpoint of the destination, counted in flight
        while the try lasts."""
        endpoint, self.tier = dest.pick(self.tried)
        self.endpoint = endpoint
        self.peer = None
        dest.state.begin(endpoint)
        try:
            return await self._connections(dest.pool_key(endpoint),
                                           lambda: dest.connect(endpoint))
        finally:
            dest.state.end(endpoint)

    async def _connections(self, key: Hashable, connect: Connector) -> TryEnd:
        """One try: a pooled connection and the exchange on it, once more on a new connection
        if the pooled one turns out stale."""
        if self.h2_pool is not None:
            return await self._streams(key, connect)
        retries = self.retries
        per_try = retries.per_try_timeout if retries is not None else None
        request, source, pool = self.request, self.source, self.pool
        dest = self.destination
        idle_timeout = dest.state.policy.idle_timeout if dest is not None else None
        exchange: Exchange | MessageExchange | None = None
        end: TryEnd | None = None
        first = True
        with bounded(per_try) as scope:
            self._per_try = scope
            while True:
                try:
                    lease = await pool.acquire(key, connect)
                except ConnectFailed as exc:
                    self.failure = exc
                    end = connect_failed(exc.reason)
                    break
                if isinstance(source, H2Request):  # an HTTP/2 caller, an HTTP/1.1 app
                    messages = self.body.for_try() if self.body is not None else source
                    exchange = self.exchange = MessageExchange(
                        request, messages, source,
                        H1Upstream(lease.stream, self.upstream_head, request, lease.reused),
                        drop_response=self.drop_response, edit_response=self.edit_response)
                else:
                    body: BodySource = (self.body.for_try() if self.body is not None
                                        else source)
                    exchange = self.exchange = Exchange(
                        request, body, source.stream, lease.stream, self.upstream_head,
                        keep_client=request.keep_alive and not self.conn.draining,
                        reused_upstream=lease.reused,
                        hold=self._hold if retries is not None else None, requests=source,
                        drop_response=self.drop_response, edit_response=self.edit_response,
                        on_switch=(self._tunnelling
                                   if self.timeout is not None or per_try is not None
                                   else None))
                try:
                    await exchange.run()
                finally:
                    await pool.release(lease, exchange.upstream_reusable, idle_timeout)
                error = exchange.upstream_error
                if error is not None and error.pooled_dead:
                    # the server closed its idle connections (restart, drain, timeout)
                    await pool.discard_idle(key)
                end = classify(exchange, timed_out=False, first_connection=first,
                               body=self.body_state())
                if end is not _STALE:
                    break
                log.debug("pooled connection for %s was stale, retrying on a new one", key)
                end, first = None, False
        if end is None:  # the per-try timeout stopped the try
            end = classify(exchange, timed_out=True, first_connection=first,
                           body=self.body_state())
        return end

    async def _streams(self, key: Hashable, connect: Connector) -> TryEnd:
        """One try over HTTP/2: a stream on a pooled connection (``H2Pool``) and the exchange
        on it, once more on a new connection if the pooled one turns out gone."""
        pool, request, source = self.h2_pool, self.request, self.source
        assert pool is not None and self.upstream_fields is not None
        retries = self.retries
        per_try = retries.per_try_timeout if retries is not None else None
        exchange: MessageExchange | None = None
        end: TryEnd | None = None
        first = True
        with bounded(per_try) as scope:
            self._per_try = scope
            while True:
                try:
                    upstream = await pool.open_stream(key, connect, self.upstream_fields,
                                                      end=request.framing is _NO_FRAMING)
                except ConnectFailed as exc:
                    self.failure = exc
                    end = connect_failed(exc.reason)
                    break
                except UpstreamFailed as exc:  # the pooled connection died under the stream
                    pool.forget_dead(key)
                    if first:  # nothing was sent: once more, on another connection
                        first = False
                        continue
                    self.failure = ConnectFailed("connect_failed", str(exc))
                    end = connect_failed("connect_failed")
                    break
                messages = self.body.for_try() if self.body is not None else source
                sink = source if isinstance(source, H2Request) else H1Sink(
                    source.stream, request, request.keep_alive and not self.conn.draining)
                exchange = self.exchange = MessageExchange(
                    request, messages, sink, upstream,
                    keep_client=request.keep_alive and not self.conn.draining,
                    hold=self._hold if retries is not None else None,
                    drop_response=self.drop_response, edit_response=self.edit_response)
                try:
                    await exchange.run()
                finally:
                    await upstream.release()
                error = exchange.upstream_error
                if error is not None and error.pooled_dead:
                    pool.forget_dead(key)
                end = classify(exchange, timed_out=False, first_connection=first,
                               body=self.body_state())
                if end is not _STALE:
                    break
                log.debug("HTTP/2 connection for %s was gone, retrying on a new one", key)
                end, first = None, False
        if end is None:  # the per-try timeout stopped the try
            end = classify(exchange, timed_out=True, first_connection=first,
                           body=self.body_state())
        return end

    def _fresh(self) -> bool:
        """Whether an endpoint neither tried by this request nor ejected is left (what the
        retries of a request that never reached an app go to)."""
        dest, endpoint = self.destination, self.endpoint
        if dest is None or endpoint is None:
            return False
        return dest.fresh_left((*self.tried, endpoint.key))

    def _hold(self, head: ResponseHead) -> bool:
        """Whether to hold back the response ``head`` starts and retry instead (paid for now:
        once held, the response is gone). A peer meshd's "never reached its app" 503 is
        noted (``peer``) for outlier detection either way."""
        status = head.status
        if self.grpc and status == 200:
            grpc_status = grpc_status_of(head.headers)  # a Trailers-Only answer
            if grpc_status and holds_grpc(self.retries, self.retries_done, grpc_status,
                                          self.method, self.body_state()):
                assert self.destination is not None
                if self.destination.spend():
                    return True
        if status == 503 or status == 502:
            self.peer = peer_failure(status, head.headers)
        if status >= 400 and holds(self.retries, self.retries_done, status, self.method,
                                   self.body_state(),
                                   failure=self.peer[1] if self.peer is not None else None,
                                   fresh=self._fresh()):
            assert self.destination is not None
            if self.destination.spend():
                return True
        self._per_try.deadline = math.inf  # relaying: only the whole timeout applies now
        return False

    def _tunnelling(self) -> None:
        """A 101 went to the client: the upgraded connection lasts as long as its two ends
        want, past the route's timeouts."""
        self._per_try.deadline = math.inf
        self._whole.deadline = math.inf

    async def _answer(self, how: Finish) -> Result:
        """The end of a request not simply relayed: answered here, or the client cut off."""
        exchange = self.exchange
        connect_reason = ""
        if how is Finish.REJECTED:
            assert self.destination is not None
            text = self.destination.state.rejection_reason()
        elif how is Finish.GATEWAY_TIMEOUT:
            text = f"upstream did not answer within {self.timeout:g}s"
        elif how is Finish.CONNECT_FAILED:
            assert self.failure is not None
            text, connect_reason = str(self.failure), self.failure.reason
        elif how is Finish.TRY_TIMEOUT:
            per_try = self.retries.per_try_timeout if self.retries is not None else None
            text = f"upstream did not answer within {per_try:g}s (per-try timeout)"
        elif how is Finish.BAD_GATEWAY:
            assert exchange is not None
            text = f"bad gateway: {exchange.upstream_error}"
        else:
            assert exchange is not None
            return await self._cut(how, exchange)
        error = exchange.upstream_error if exchange is not None else None
        code = error_code(how, connect_reason, app=self.destination is None,
                          malformed=error is not None and error.malformed)
        headers = [(ERROR_HEADER, code.encode("ascii")),
                   (REASON_HEADER, text.encode("ascii", "replace"))]
        if how is Finish.CONNECT_FAILED:
            # Nothing went upstream: read a short body to its end, so the client's connection
            # stays usable (and is not reset under our answer by unread bytes).
            await discard_body(self.source, self.request)
        keep = await answer_locally(self.source, self.request, self.conn, how.status, text,
                                    headers)
        return Result(how.status, keep, text, code)

    async def _cut(self, how: Finish, exchange: Exchange | MessageExchange) -> Result:
        """The ends that close the client's connection."""
        if how is Finish.CUT_OFF:
            return _cut_result(exchange, "timed out while relaying the response")
        if how is Finish.BROKE_OFF:
            return _cut_result(exchange, str(exchange.upstream_error))
        error = exchange.client_error
        if how is Finish.BAD_REQUEST and isinstance(error, ProtocolError):
            if isinstance(self.source, H2Request):
                await self.source.answer(error.status, str(error))
                return Result(error.status, False, str(error))
            try:
                await self.source.stream.send_all(simple_response(error.status, str(error),
                                                                  close=True))
            except STREAM_ERRORS:
                pass
            return Result(error.status, False, str(error))
        return _cut_result(exchange, str(error))  # CLIENT_GONE


def _cut_result(exchange: Exchange | MessageExchange, detail: str) -> Result:
    """A request whose client connection closes, with the body bytes that went each way."""
    return Result(exchange.status, False, detail, request_bytes=exchange.request_bytes,
                  response_bytes=exchange.response_bytes)
