"""The decisions of the one attempt loop: table tests over the pure core (an exchange's report
as a plain record, no streams)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from meshd.config.schema import RetryPolicy
from meshd.proxy.core.attempt import (
    Finish,
    Step,
    TryEnd,
    classify,
    conclusion,
    connect_failed,
    error_code,
    finish,
    holds,
    next_step,
    outlier_outcome,
    peer_failure,
    pooled_dead,
    reusable,
    stale,
)
from meshd.proxy.core.http1 import ProtocolError
from meshd.proxy.core.outlier import Failure, Outcome
from meshd.proxy.core.retry import IMPLICIT_RETRIES, Body, route_retries


@dataclass(frozen=True)
class Fault:
    stale: bool = False


@dataclass(frozen=True)
class Report:
    """What an exchange reports (``meshd.proxy.exchange.Exchange`` has the same fields)."""

    held_status: int = 0
    response_started: bool = False
    client_error: Exception | None = None
    upstream_error: Fault | None = None


RESET = Fault()  # the upstream failed (reset, closed, malformed answer)
STALE = Fault(stale=True)  # ... on a pooled connection, before any answer, a bodiless request
GONE = Exception("client connection failed")
BAD_BODY = ProtocolError("malformed chunk", 400)

# -- one connection --------------------------------------------------------------------------


@pytest.mark.parametrize(("reused", "answered", "started", "bodiless", "expected"), [
    (True, False, False, True, True),  # the server had closed the pooled connection
    (False, False, False, True, False),  # a new connection failing is a failure
    (True, True, False, True, False),  # the whole answer came
    (True, False, True, True, False),  # part of it reached the client
    (True, False, False, False, False),  # its body cannot be sent again
])
def test_stale(reused: bool, answered: bool, started: bool, bodiless: bool,
               expected: bool) -> None:
    assert stale(reused, answered, started, bodiless) is expected


@pytest.mark.parametrize(("reused", "received", "expected"), [
    (True, False, True), (True, True, False), (False, False, False), (False, True, False)])
def test_pooled_dead(reused: bool, received: bool, expected: bool) -> None:
    assert pooled_dead(reused, received) is expected


@pytest.mark.parametrize(("response_read", "request_sent", "keep_alive", "extra", "failed",
                          "expected"), [
    (True, True, True, False, False, True),
    (False, True, True, False, False, False),  # response not read to its end
    (True, False, True, False, False, False),  # an early answer, the body not all sent
    (True, True, False, False, False, False),  # Connection: close
    (True, True, True, True, False, False),  # bytes after the response
    (True, True, True, False, True, False),  # the connection failed
])
def test_reusable(response_read: bool, request_sent: bool, keep_alive: bool, extra: bool,
                  failed: bool, expected: bool) -> None:
    assert reusable(response_read, request_sent, keep_alive, extra, failed) is expected


# -- one try ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("reason", "expected"), [
    ("connect_failed", TryEnd.CONNECT_FAILED), ("connect_timeout", TryEnd.CONNECT_FAILED),
    ("bad_certificate", TryEnd.CONNECT_FAILED), ("app_connect_failed", TryEnd.CONNECT_FAILED),
    ("no_identity", TryEnd.NOT_CONNECTED),  # our own doing: not the endpoint's fault
])
def test_connect_failed(reason: str, expected: TryEnd) -> None:
    assert connect_failed(reason) is expected


@pytest.mark.parametrize(("report", "timed_out", "first", "body", "expected"), [
    # the stale-connection retry: once, on the first connection, for a request sent again
    (Report(upstream_error=STALE), False, True, Body.NONE, TryEnd.STALE),
    (Report(upstream_error=STALE), False, True, Body.HELD, TryEnd.STALE),
    (Report(upstream_error=STALE), False, False, Body.NONE, TryEnd.RESET),  # once only
    (Report(upstream_error=STALE), False, True, Body.LOST, TryEnd.RESET),
    (Report(upstream_error=STALE), True, True, Body.NONE, TryEnd.TIMED_OUT),
    (Report(held_status=503, upstream_error=STALE), False, True, Body.NONE, TryEnd.STALE),
    # a response
    (Report(response_started=True), False, True, Body.NONE, TryEnd.ANSWERED),
    (Report(response_started=True), True, True, Body.NONE, TryEnd.ANSWERED),
    (Report(response_started=True, upstream_error=RESET), False, True, Body.NONE,
     TryEnd.BROKE_OFF),
    (Report(response_started=True, client_error=GONE), False, True, Body.NONE,
     TryEnd.ANSWERED),
    (Report(held_status=503), False, True, Body.NONE, TryEnd.HELD),
    (Report(held_status=503), True, True, Body.NONE, TryEnd.HELD),  # stopped while draining
    # no response
    (None, True, True, Body.NONE, TryEnd.TIMED_OUT),  # stopped before an exchange started
    (Report(), True, True, Body.NONE, TryEnd.TIMED_OUT),
    (Report(upstream_error=RESET), True, False, Body.NONE, TryEnd.TIMED_OUT),
    (Report(client_error=GONE), False, True, Body.NONE, TryEnd.CLIENT_FAILED),
    (Report(client_error=BAD_BODY), False, True, Body.HELD, TryEnd.CLIENT_FAILED),
    (Report(client_error=GONE, upstream_error=RESET), False, True, Body.NONE,
     TryEnd.CLIENT_FAILED),
    (Report(upstream_error=RESET), False, True, Body.NONE, TryEnd.RESET),
    (Report(upstream_error=RESET), False, True, Body.LOST, TryEnd.RESET),
])
def test_classify(report: Report | None, timed_out: bool, first: bool, body: Body,
                  expected: TryEnd) -> None:
    assert classify(report, timed_out=timed_out, first_connection=first, body=body) is expected


def test_classify_needs_an_exchange_unless_stopped() -> None:
    with pytest.raises(AssertionError):
        classify(None, timed_out=False, first_connection=True, body=Body.NONE)


@pytest.mark.parametrize(("end", "expected"), [
    (TryEnd.ANSWERED, 503), (TryEnd.HELD, 503), (TryEnd.BROKE_OFF, Failure.RESET),
    (TryEnd.CLIENT_FAILED, None), (TryEnd.STALE, None),
    (TryEnd.CONNECT_FAILED, Failure.CONNECT), (TryEnd.NOT_CONNECTED, None),
    (TryEnd.TIMED_OUT, Failure.TIMEOUT), (TryEnd.RESET, Failure.RESET),
])
def test_outlier_outcome(end: TryEnd, expected: Outcome | None) -> None:
    assert outlier_outcome(end, 503) == expected


def test_every_end_has_an_outlier_outcome() -> None:
    for end in TryEnd:
        outlier_outcome(end, 200)


GATEWAY = RetryPolicy(2, None, ("connect-failure", "gateway-error", "reset"))
ON_503 = RetryPolicy(1, 0.5, ("503",))
ON_TIMEOUT = RetryPolicy(1, 0.5, ("timeout",))
OFF = RetryPolicy(0)


@pytest.mark.parametrize(("policy", "done", "status", "method", "body", "expected"), [
    (None, 0, 503, "GET", Body.NONE, False),  # inbound: a route without retries
    (ON_503, 0, 503, "GET", Body.NONE, True),
    (ON_503, 1, 503, "GET", Body.NONE, False),  # no retries left
    (ON_503, 0, 502, "GET", Body.NONE, False),  # not retried on
    (ON_503, 0, 200, "GET", Body.NONE, False),
    (GATEWAY, 0, 504, "GET", Body.NONE, True),
    (GATEWAY, 0, 500, "GET", Body.NONE, False),
    (GATEWAY, 0, 503, "POST", Body.NONE, False),  # a body-less POST is not repeated
    (GATEWAY, 0, 503, "POST", Body.HELD, True),
    (GATEWAY, 0, 503, "PUT", Body.LOST, False),
    (OFF, 0, 503, "GET", Body.NONE, False),
])
def test_holds(policy: RetryPolicy | None, done: int, status: int, method: str, body: Body,
               expected: bool) -> None:
    assert holds(policy, done, status, method, body) is expected


TRY_ENDS = [end for end in TryEnd if end is not TryEnd.STALE]


@pytest.mark.parametrize("end", TRY_ENDS)
def test_inbound_every_try_is_the_last(end: TryEnd) -> None:
    """A route without retries: whatever the try came to, the request finishes (a held
    response needs a route that retries, and is the one exception)."""
    step = next_step(end, outlier_outcome(end, 502), None, 0, "GET", Body.NONE)
    assert step is (Step.RETRY_PAID if end is TryEnd.HELD else Step.FINISH)


@pytest.mark.parametrize(("end", "status", "policy", "done", "method", "body", "expected"), [
    # final whatever the route says
    (TryEnd.ANSWERED, 503, GATEWAY, 0, "GET", Body.NONE, Step.FINISH),
    (TryEnd.BROKE_OFF, 200, GATEWAY, 0, "GET", Body.NONE, Step.FINISH),
    (TryEnd.CLIENT_FAILED, 0, GATEWAY, 0, "GET", Body.NONE, Step.FINISH),
    (TryEnd.NOT_CONNECTED, 0, GATEWAY, 0, "GET", Body.NONE, Step.FINISH),
    # held: decided and paid for already
    (TryEnd.HELD, 503, ON_503, 0, "GET", Body.NONE, Step.RETRY_PAID),
    # the route's retry policy
    (TryEnd.CONNECT_FAILED, 0, GATEWAY, 0, "POST", Body.LOST, Step.FINISH),  # body gone
    (TryEnd.CONNECT_FAILED, 0, GATEWAY, 0, "POST", Body.NONE, Step.RETRY),  # nothing sent
    (TryEnd.CONNECT_FAILED, 0, GATEWAY, 2, "GET", Body.NONE, Step.FINISH),  # none left
    # never reached an app: retried (to an untried endpoint) whatever retry_on says
    (TryEnd.CONNECT_FAILED, 0, ON_503, 0, "POST", Body.HELD, Step.RETRY),
    (TryEnd.CONNECT_FAILED, 0, ON_503, 1, "GET", Body.NONE, Step.RETRY),  # the floor: 2
    (TryEnd.CONNECT_FAILED, 0, ON_503, 2, "GET", Body.NONE, Step.FINISH),
    (TryEnd.CONNECT_FAILED, 0, OFF, 0, "GET", Body.NONE, Step.FINISH),
    (TryEnd.RESET, 0, GATEWAY, 1, "GET", Body.NONE, Step.RETRY),
    (TryEnd.RESET, 0, GATEWAY, 0, "POST", Body.NONE, Step.FINISH),
    (TryEnd.RESET, 0, GATEWAY, 0, "POST", Body.HELD, Step.RETRY),
    (TryEnd.RESET, 0, ON_TIMEOUT, 0, "GET", Body.NONE, Step.FINISH),
    (TryEnd.TIMED_OUT, 0, ON_TIMEOUT, 0, "GET", Body.NONE, Step.RETRY),
    (TryEnd.TIMED_OUT, 0, ON_TIMEOUT, 1, "GET", Body.NONE, Step.FINISH),
    (TryEnd.TIMED_OUT, 0, GATEWAY, 0, "GET", Body.NONE, Step.RETRY),  # gateway-error: any
    (TryEnd.TIMED_OUT, 0, ON_503, 0, "GET", Body.NONE, Step.FINISH),
])
def test_next_step(end: TryEnd, status: int, policy: RetryPolicy, done: int, method: str,
                   body: Body, expected: Step) -> None:
    assert next_step(end, outlier_outcome(end, status), policy, done, method, body) is expected


def test_a_stale_connection_does_not_end_a_try() -> None:
    with pytest.raises(AssertionError):
        next_step(TryEnd.STALE, None, GATEWAY, 0, "GET", Body.NONE)


def test_stale_connection_retried_once_then_the_request_finishes() -> None:
    """Inbound, a body-less GET: the pooled connection was stale, the new one was reset."""
    first = classify(Report(upstream_error=STALE), timed_out=False, first_connection=True,
                     body=Body.NONE)
    assert first is TryEnd.STALE  # the same try, on a new connection
    second = classify(Report(upstream_error=STALE), timed_out=False, first_connection=False,
                      body=Body.NONE)
    assert second is TryEnd.RESET
    step = next_step(second, outlier_outcome(second, 0), None, 0, "GET", Body.NONE)
    assert step is Step.FINISH
    assert finish(second, Report(upstream_error=STALE), rejected=False,
                  timed_out=False) is Finish.BAD_GATEWAY


# -- the request -----------------------------------------------------------------------------


@pytest.mark.parametrize(("end", "report", "rejected", "timed_out", "expected"), [
    (None, None, True, False, Finish.REJECTED),
    (None, None, False, True, Finish.GATEWAY_TIMEOUT),  # waiting for a connection slot
    (TryEnd.HELD, Report(held_status=503), False, True, Finish.GATEWAY_TIMEOUT),
    (TryEnd.CONNECT_FAILED, None, False, True, Finish.GATEWAY_TIMEOUT),
    (TryEnd.ANSWERED, Report(response_started=True), False, True, Finish.CUT_OFF),
    (TryEnd.CONNECT_FAILED, None, False, False, Finish.CONNECT_FAILED),
    (TryEnd.NOT_CONNECTED, None, False, False, Finish.CONNECT_FAILED),
    (TryEnd.CONNECT_FAILED, Report(upstream_error=STALE), False, False,
     Finish.BAD_GATEWAY),  # stale, then no new connection: the request may have arrived
    (TryEnd.CONNECT_FAILED, Report(held_status=503), False, False,
     Finish.CONNECT_FAILED),  # an answer held back, then no connection: no app reached
    (TryEnd.TIMED_OUT, None, False, False, Finish.TRY_TIMEOUT),
    (TryEnd.TIMED_OUT, Report(), False, False, Finish.TRY_TIMEOUT),
    (TryEnd.ANSWERED, Report(response_started=True), False, False, Finish.RELAYED),
    (TryEnd.BROKE_OFF, Report(response_started=True, upstream_error=RESET), False, False,
     Finish.BROKE_OFF),
    (TryEnd.RESET, Report(upstream_error=RESET), False, False, Finish.BAD_GATEWAY),
    (TryEnd.CLIENT_FAILED, Report(client_error=GONE), False, False, Finish.CLIENT_GONE),
    (TryEnd.CLIENT_FAILED, Report(client_error=BAD_BODY), False, False, Finish.BAD_REQUEST),
    (TryEnd.ANSWERED, Report(response_started=True, client_error=GONE), False, False,
     Finish.CLIENT_GONE),
])
def test_finish(end: TryEnd | None, report: Report | None, rejected: bool, timed_out: bool,
                expected: Finish) -> None:
    assert finish(end, report, rejected=rejected, timed_out=timed_out) is expected


@pytest.mark.parametrize(("report", "expected"), [
    (Report(response_started=True), Finish.RELAYED),
    (Report(client_error=BAD_BODY), Finish.BAD_REQUEST),  # its 4xx, the connection closed
    (Report(client_error=BAD_BODY, response_started=True), Finish.CLIENT_GONE),
    (Report(client_error=GONE), Finish.CLIENT_GONE),
    (Report(client_error=GONE, upstream_error=RESET), Finish.CLIENT_GONE),
    (Report(upstream_error=RESET), Finish.BAD_GATEWAY),
    (Report(upstream_error=RESET, response_started=True), Finish.BROKE_OFF),
])
def test_conclusion(report: Report, expected: Finish) -> None:
    assert conclusion(report) is expected


@pytest.mark.parametrize(("how", "status"), [
    (Finish.REJECTED, 503), (Finish.GATEWAY_TIMEOUT, 504), (Finish.TRY_TIMEOUT, 504),
    (Finish.CONNECT_FAILED, 503), (Finish.BAD_GATEWAY, 502),
    (Finish.RELAYED, 0), (Finish.CUT_OFF, 0), (Finish.BAD_REQUEST, 0),
    (Finish.CLIENT_GONE, 0), (Finish.BROKE_OFF, 0),
])
def test_what_meshd_answers_itself(how: Finish, status: int) -> None:
    assert how.status == status


# -- what never reached an app -----------------------------------------------------------------

UNREACHED_503 = [(b"Content-Length", b"0"), (b"X-Meshd-Error", b"app-connect-failed")]


@pytest.mark.parametrize(("status", "headers", "found"), [
    (503, UNREACHED_503, ("app-connect-failed", Failure.CONNECT)),
    (503, [(b"x-meshd-error", b" app-connect-timeout ")], ("app-connect-timeout",
                                                          Failure.CONNECT)),
    (502, [(b"x-meshd-error", b"app-reset")], ("app-reset", Failure.RESET)),
    (503, [(b"x-meshd-error", b"connect-failed")], None),  # the peer's own upstream: not ours
    (503, [(b"x-meshd-error", b"circuit-open")], None),
    (502, UNREACHED_503, None),  # each code comes with its own status
    (503, [(b"x-meshd-error", b"app-reset")], None),
    (502, [(b"x-meshd-error", b"app-bad-response")], None),  # garbage: not a reset
    (503, [], None),
])
def test_peer_failure(status: int, headers: list[tuple[bytes, bytes]],
                      found: tuple[str, Failure] | None) -> None:
    assert peer_failure(status, headers) == found


@pytest.mark.parametrize(("policy", "done", "method", "body", "fresh", "expected"), [
    (IMPLICIT_RETRIES, 0, "POST", Body.HELD, True, True),  # any method: it never arrived
    (IMPLICIT_RETRIES, 1, "POST", Body.NONE, True, True),
    (IMPLICIT_RETRIES, 2, "GET", Body.NONE, True, False),  # two retries at most
    (IMPLICIT_RETRIES, 0, "GET", Body.NONE, False, False),  # no endpoint left to try
    (IMPLICIT_RETRIES, 0, "POST", Body.LOST, True, False),  # its body is gone
    (ON_503, 0, "POST", Body.HELD, True, True),
    (RetryPolicy(1, None, ("5xx",)), 1, "POST", Body.HELD, True, True),  # declared: a floor
    (RetryPolicy(5, None, ("5xx",)), 3, "GET", Body.NONE, False, True),  # declared: more
    (OFF, 0, "GET", Body.NONE, True, False),  # attempts = 0 turns even these off
    (None, 0, "GET", Body.NONE, True, False),  # inbound
])
def test_a_peer_meshd_that_never_reached_its_app_is_held_and_retried(
        policy: RetryPolicy | None, done: int, method: str, body: Body, fresh: bool,
        expected: bool) -> None:
    assert holds(policy, done, 503, method, body, failure=Failure.CONNECT,
                 fresh=fresh) is expected
    # ... and told to outlier detection as a connect failure of that endpoint, held or not
    for end in (TryEnd.HELD, TryEnd.ANSWERED):
        assert outlier_outcome(end, 503, Failure.CONNECT) is Failure.CONNECT


@pytest.mark.parametrize(("policy", "method", "body", "expected"), [
    (RetryPolicy(1, None, ("reset",)), "GET", Body.NONE, True),
    (RetryPolicy(1, None, ("reset",)), "POST", Body.NONE, False),  # it may have arrived
    (RetryPolicy(1, None, ("502",)), "GET", Body.NONE, True),
    (RetryPolicy(1, None, ("503",)), "GET", Body.NONE, False),
    (IMPLICIT_RETRIES, "GET", Body.NONE, False),  # no floor: it may have reached the app
])
def test_an_app_reset_behind_the_peer_counts_as_a_reset(
        policy: RetryPolicy, method: str, body: Body, expected: bool) -> None:
    assert holds(policy, 0, 502, method, body, failure=Failure.RESET) is expected
    assert outlier_outcome(TryEnd.ANSWERED, 502, Failure.RESET) is Failure.RESET


def test_an_app_503_is_not_retried_by_the_implicit_policy() -> None:
    assert not holds(IMPLICIT_RETRIES, 0, 503, "GET", Body.NONE)
    assert next_step(TryEnd.RESET, Failure.RESET, IMPLICIT_RETRIES, 0, "GET",
                     Body.NONE) is Step.FINISH  # a reset may have reached the app
    assert next_step(TryEnd.CONNECT_FAILED, Failure.CONNECT, IMPLICIT_RETRIES, 0, "POST",
                     Body.HELD) is Step.RETRY
    assert next_step(TryEnd.CONNECT_FAILED, Failure.CONNECT, IMPLICIT_RETRIES, 0, "POST",
                     Body.HELD, fresh=False) is Step.FINISH


def test_route_retries_default_to_the_implicit_policy() -> None:
    assert route_retries(None) is IMPLICIT_RETRIES
    assert route_retries(ON_503) is ON_503
    assert IMPLICIT_RETRIES.attempts == 2 and IMPLICIT_RETRIES.retry_on == ("connect-failure",)


@pytest.mark.parametrize(("how", "reason", "status", "code"), [
    (Finish.CONNECT_FAILED, "connect_timeout", 503, "connect-timeout"),
    (Finish.CONNECT_FAILED, "connect_failed", 503, "connect-failed"),
    (Finish.CONNECT_FAILED, "app_connect_failed", 503, "app-connect-failed"),
    (Finish.CONNECT_FAILED, "wrong_identity", 503, "wrong-identity"),
    (Finish.REJECTED, "", 503, "circuit-open"),
    (Finish.BAD_GATEWAY, "", 502, "upstream-reset"),
    (Finish.GATEWAY_TIMEOUT, "", 504, "timeout"),
    (Finish.TRY_TIMEOUT, "", 504, "per-try-timeout"),
])
def test_meshd_answers_carry_a_status_and_a_code(how: Finish, reason: str, status: int,
                                                  code: str) -> None:
    assert (how.status, error_code(how, reason)) == (status, code)


def test_a_bad_gateway_says_whose_and_what() -> None:
    assert error_code(Finish.BAD_GATEWAY, app=True) == "app-reset"
    assert error_code(Finish.BAD_GATEWAY, app=True, malformed=True) == "app-bad-response"
    assert error_code(Finish.BAD_GATEWAY, malformed=True) == "upstream-bad-response"
