"""The decisions of the one attempt loop (``meshd.proxy.attempts``), both directions. Pure.

A request is forwarded in *tries*; a try takes a pooled connection, runs one exchange on it and
ends in a ``TryEnd``. The loop then takes a ``Step``, and once no try is left, the request
ends in a ``Finish``: relayed, or answered by meshd itself.

    connection ── exchange ── classify ─┬─ STALE ───────── the same try on a new connection (once)
                                        └─ other ends ─── next_step ─┬─ RETRY / RETRY_PAID: next try
                                                                     └─ FINISH: finish → answer

===============  ==========================================  ==================  ===============
TryEnd           what happened                               outlier outcome     after it
===============  ==========================================  ==================  ===============
ANSWERED         a response started towards the client       its status          final
BROKE_OFF        ... and then the upstream failed            reset               final
CLIENT_FAILED    the client left, or sent a malformed body   (none)              final
HELD             a response the route retries, held back     its status          retry (paid)
STALE            a pooled connection the server had closed   (none)              new connection
CONNECT_FAILED   no connection could be made                 connect-failure     retry policy
NOT_CONNECTED    no connection, our own doing (no identity)  (none)              final
TIMED_OUT        the per-try timeout, no response started    timeout             retry policy
RESET            the upstream failed before a response       reset               retry policy
===============  ==========================================  ==================  ===============

Inbound is a route without retries: it holds no response back, and every end but ``STALE``
finishes its request.

meshd's own answers (``Finish`` with a status) carry ``x-meshd-error``, a short code saying
what failed (``error_code``), and ``x-meshd-reason`` in words. 503 means nothing reached an app
(no connection to the peer meshd, the peer meshd could not connect to its app, no healthy
endpoint, the circuit breaker); 502 an upstream that failed or answered garbage after the
request went out; 504 a timeout of a started request.

The peer meshd is transparent to the caller's decisions (``peer_failure``): its 503
``app-connect-*`` counts as a connect failure (never reached an app: retried on another
endpoint for any method) and its 502 ``app-reset`` (the app's connection broke before a
response head: it may have seen the request) as a reset, for retries and outlier detection
alike. These codes are trusted only from a peer meshd: the inbound side drops the header from
its app's responses, so an app cannot claim it never saw a request.

What to retry is ``meshd.proxy.core.retry``'s (``retry_verdict``); the retry budget is spent by
the shell after a ``RETRY`` step (a ``HELD`` response was paid for when it was held). Whether a
connection is stale, dead with its idle siblings, or reusable after an exchange is decided
here too (``stale``, ``pooled_dead``, ``reusable``), from what the exchange saw.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import Protocol

from meshd.config.schema import RetryPolicy
from meshd.proxy.core.grpc import http_equivalent
from meshd.proxy.core.grpc import retries_on as grpc_retries_on
from meshd.proxy.core.http1 import ProtocolError
from meshd.proxy.core.outlier import Failure, Outcome
from meshd.proxy.core.retry import Body, condition_met, retry_verdict, safe_to_repeat

# Failed connects that are our own doing (no certificate yet): not the endpoint's fault.
LOCAL_CONNECT_FAILURES = frozenset({"no_identity"})

ERROR_HEADER = b"x-meshd-error"  # on meshd's own answers: what failed, as a short code
REASON_HEADER = b"x-meshd-reason"  # ... and why, in words
# the inbound side's codes for what happened to its app, with the status they come as and
# what they count as at the caller
PEER_FAILURES = {b"app-connect-failed": (503, Failure.CONNECT),
                 b"app-connect-timeout": (503, Failure.CONNECT),
                 b"app-reset": (502, Failure.RESET)}


class TryEnd(Enum):
    """How one try ended (the table in the module doc)."""

    ANSWERED = "answered"
    BROKE_OFF = "broke-off"
    CLIENT_FAILED = "client-failed"
    HELD = "held"
    STALE = "stale"
    CONNECT_FAILED = "connect-failed"
    NOT_CONNECTED = "not-connected"
    TIMED_OUT = "timed-out"
    RESET = "reset"


class Step(Enum):
    """What the loop does after a try that was not ``STALE``."""

    RETRY = "retry"  # another try, if the retry budget has one to spare
    RETRY_PAID = "retry-paid"  # another try, paid for when the response was held
    FINISH = "finish"  # no more tries: ``finish`` says how the request ends


class Finish(Enum):
    """How a request ends once its tries are over. ``status`` is what meshd answers itself
    (0: the exchange's own status, or nothing, goes to the client)."""

    RELAYED = ("relayed", 0)  # the response went to the client (whole, unless cut)
    REJECTED = ("rejected", 503)  # the circuit breaker: 503 with ``x-meshd-reason``
    GATEWAY_TIMEOUT = ("gateway-timeout", 504)  # the request timeout, no response started
    CUT_OFF = ("cut-off", 0)  # the request timeout while relaying: the client is cut off
    CONNECT_FAILED = ("connect-failed", 503)  # the last try got no connection
    TRY_TIMEOUT = ("try-timeout", 504)  # the last try's per-try timeout
    BAD_REQUEST = ("bad-request", 0)  # a malformed body, no response started: its 4xx, closed
    CLIENT_GONE = ("client-gone", 0)  # the client left mid-exchange: nothing to answer
    BAD_GATEWAY = ("bad-gateway", 502)  # the upstream failed before its response started
    BROKE_OFF = ("broke-off", 0)  # the upstream failed mid-response: the client is cut off

    @property
    def status(self) -> int:
        return self.value[1]


def error_code(how: Finish, connect_reason: str = "", *, app: bool = False,
               malformed: bool = False) -> str:
    """The ``x-meshd-error`` code of meshd's own answer ``how`` (``connect_reason``: the
    connect failure's label, for ``CONNECT_FAILED``: ``connect-timeout``,
    ``app-connect-failed``, ``wrong-identity``, ...). ``BAD_GATEWAY``: ``app``, the upstream
    is the local app (inbound); ``malformed``, it answered garbage rather than breaking off."""
    if how is Finish.CONNECT_FAILED:
        return connect_reason.replace("_", "-") or "connect-failed"
    if how is Finish.BAD_GATEWAY:
        what = "bad-response" if malformed else "reset"
        return f"app-{what}" if app else f"upstream-{what}"
    return _CODES[how]


_CODES = {Finish.REJECTED: "circuit-open", Finish.GATEWAY_TIMEOUT: "timeout",
          Finish.TRY_TIMEOUT: "per-try-timeout"}
NO_ENDPOINT_CODE = "no-healthy-endpoint"
FAULT_CODE = "fault-injected"


def peer_failure(status: int, headers: Iterable[tuple[bytes, bytes]]
                 ) -> tuple[str, Failure] | None:
    """What a peer meshd's answer says happened to its app (module doc): its code and the
    failure it counts as; None for any other response (an app's own, or meshd's about
    something else)."""
    if status != 503 and status != 502:
        return None
    for name, value in headers:
        if name.lower() == ERROR_HEADER:
            found = PEER_FAILURES.get(value.strip())
            if found is None or found[0] != status:
                return None
            return value.strip().decode("ascii"), found[1]
    return None


# Members as module names, for what the functions below check or return on every request: in
# Python 3.11 reading a member through its class (``TryEnd.HELD``) costs about 0.1 µs, a module
# name a tenth of that.
_ANSWERED, _BROKE_OFF, _CLIENT_FAILED = TryEnd.ANSWERED, TryEnd.BROKE_OFF, TryEnd.CLIENT_FAILED
_HELD, _STALE, _RESET = TryEnd.HELD, TryEnd.STALE, TryEnd.RESET
_CONNECT_FAILED, _NOT_CONNECTED = TryEnd.CONNECT_FAILED, TryEnd.NOT_CONNECTED
_TIMED_OUT = TryEnd.TIMED_OUT
_RETRY, _RETRY_PAID, _FINISH = Step.RETRY, Step.RETRY_PAID, Step.FINISH
_RELAYED, _CLIENT_GONE, _BAD_REQUEST = Finish.RELAYED, Finish.CLIENT_GONE, Finish.BAD_REQUEST


class UpstreamFault(Protocol):
    @property
    def stale(self) -> bool: ...


class ExchangeReport(Protocol):
    """What the loop's decisions read of an exchange (``meshd.proxy.exchange.Exchange``)."""

    @property
    def held_status(self) -> int: ...

    @property
    def response_started(self) -> bool: ...

    @property
    def client_error(self) -> Exception | None: ...

    @property
    def upstream_error(self) -> UpstreamFault | None: ...


# -- one connection --------------------------------------------------------------------------


def pooled_dead(reused: bool, received: bool) -> bool:
    """Whether a failed connection shows its server had closed it: a reused one that failed
    before a byte of an answer came (a restarted or draining server closed its other idle
    ones too: the pool drops them)."""
    return reused and not received


def stale(reused: bool, answered: bool, response_started: bool, bodiless: bool) -> bool:
    """Whether a failed connection may be given up for a new one, the request sent again as it
    was: a reused connection, no whole answer read nor any of it relayed, and a request without
    a body (only that one can be sent again from what the client sent)."""
    return reused and not answered and not response_started and bodiless


def reusable(response_read: bool, request_sent: bool, keep_alive: bool, extra: bool,
             failed: bool) -> bool:
    """Whether an upstream connection goes back to the pool after its exchange: the whole
    response read (relayed, or a held one drained), the whole request sent, the server keeping
    the connection alive, nothing extra after the response, no failure."""
    return response_read and request_sent and keep_alive and not extra and not failed


# -- one try ---------------------------------------------------------------------------------


def connect_failed(reason: str) -> TryEnd:
    """The end of a try that got no connection (``reason``: the connect failure's label)."""
    return _NOT_CONNECTED if reason in LOCAL_CONNECT_FAILURES else _CONNECT_FAILED


def classify(exchange: ExchangeReport | None, *, timed_out: bool, first_connection: bool,
             body: Body) -> TryEnd:
    """The end of a try whose exchange ran, or was stopped by the per-try timeout
    (``timed_out``; ``exchange`` None: before one started). ``STALE`` only on a try's first
    connection (a new one is never stale) and for a request that can be sent again (``body``
    not ``LOST``)."""
    if exchange is None:
        if not timed_out:
            raise AssertionError("a try that was not stopped ran an exchange")
        return _TIMED_OUT
    error = exchange.upstream_error
    if (error is not None and error.stale and first_connection and not timed_out
            and body is not Body.LOST):
        return _STALE
    if exchange.held_status:
        return _HELD
    if exchange.response_started:
        return _BROKE_OFF if error is not None else _ANSWERED
    if timed_out:
        return _TIMED_OUT
    if exchange.client_error is not None:
        return _CLIENT_FAILED
    if error is not None:
        return _RESET
    return _ANSWERED


_OUTLIER_FAILURES: dict[TryEnd, Failure | None] = {
    TryEnd.BROKE_OFF: Failure.RESET,
    TryEnd.CLIENT_FAILED: None,  # the client's doing, nothing to say about the endpoint
    TryEnd.STALE: None,
    TryEnd.CONNECT_FAILED: Failure.CONNECT,
    TryEnd.NOT_CONNECTED: None,
    TryEnd.TIMED_OUT: Failure.TIMEOUT,
    TryEnd.RESET: Failure.RESET,
}


def outlier_outcome(end: TryEnd, status: int, failure: Failure | None = None
                    ) -> Outcome | None:
    """What the outlier detector is told of a try (``status``: of the response answered or
    held; ``failure``: what a peer meshd's answer says happened to its app, counted as that
    endpoint's), None when the try says nothing about the endpoint."""
    if end is _ANSWERED or end is _HELD:
        return failure if failure is not None else status
    return _OUTLIER_FAILURES[end]


def holds(policy: RetryPolicy | None, retries_done: int, status: int, method: str,
          body: Body, *, failure: Failure | None = None, fresh: bool = True) -> bool:
    """Whether to hold back a final response with ``status`` and retry instead, budget aside
    (the shell spends it at once: once held, the response is gone). ``failure``: what the
    answer counts as (``peer_failure``); ``fresh``: as ``retry_verdict``'s."""
    if policy is None or status < 400:
        return False
    if failure is None and not condition_met(status, policy.retry_on):
        return False
    outcome = failure if failure is not None else status
    return retry_verdict(policy, retries_done, outcome, method, body, status=status,
                         fresh=fresh).retry


def holds_grpc(policy: RetryPolicy | None, retries_done: int, grpc_status: int, method: str,
               body: Body) -> bool:
    """Whether to hold back a gRPC call's Trailers-Only answer with ``grpc_status`` and retry
    (``retry_on`` names the status: ``core.grpc.RETRY_NAMES``), budget aside."""
    if policy is None or grpc_status == 0 or retries_done >= policy.attempts:
        return False
    if not grpc_retries_on(policy.retry_on, grpc_status):
        return False
    return safe_to_repeat(method, body, http_equivalent(grpc_status))


def next_step(end: TryEnd, outcome: Outcome | None, policy: RetryPolicy | None,
              retries_done: int, method: str, body: Body, *, fresh: bool = True) -> Step:
    """What follows a try that ended in ``end`` (``outcome``: its ``outlier_outcome``) after
    ``retries_done`` retries, on a route whose retries are ``policy`` (None: it has none, as
    inbound; ``fresh``: an endpoint not tried yet is left). Never ``STALE``: such a try goes
    on, on a new connection."""
    if end is _HELD:
        return _RETRY_PAID
    if end is _STALE:
        raise AssertionError("a stale connection does not end a try")
    if policy is None or outcome is None or end is _ANSWERED or end is _BROKE_OFF:
        return _FINISH
    if retry_verdict(policy, retries_done, outcome, method, body, fresh=fresh).retry:
        return _RETRY
    return _FINISH


# -- the request -----------------------------------------------------------------------------


def finish(end: TryEnd | None, exchange: ExchangeReport | None, *, rejected: bool,
           timed_out: bool) -> Finish:
    """How a request ends: ``end`` of its last try (None: no try was made), ``exchange`` the
    latest one run (None: none was), ``rejected`` by the circuit breaker, ``timed_out`` by the
    whole-request timeout."""
    if rejected:
        return Finish.REJECTED
    if timed_out:
        started = exchange is not None and exchange.response_started
        return Finish.CUT_OFF if started else Finish.GATEWAY_TIMEOUT
    if end is _CONNECT_FAILED or end is _NOT_CONNECTED:
        if exchange is not None and not exchange.held_status:
            # The request went out on a connection that then failed (a pooled one found dead,
            # or an earlier try's reset) before the new connection failed: it may have
            # reached an app, so this is no "never reached" 503.
            return Finish.BAD_GATEWAY
        return Finish.CONNECT_FAILED
    if end is _TIMED_OUT:
        return Finish.TRY_TIMEOUT
    if exchange is None:
        raise AssertionError(f"a try that ended {end} ran no exchange")
    return conclusion(exchange)


def conclusion(exchange: ExchangeReport) -> Finish:
    """The end of a request whose last exchange ran its course: relayed, or failed on either
    side (the client answered only if its response had not started)."""
    if exchange.client_error is not None:
        if isinstance(exchange.client_error, ProtocolError) and not exchange.response_started:
            return _BAD_REQUEST
        return _CLIENT_GONE
    if exchange.upstream_error is not None:
        return Finish.BROKE_OFF if exchange.response_started else Finish.BAD_GATEWAY
    return _RELAYED
