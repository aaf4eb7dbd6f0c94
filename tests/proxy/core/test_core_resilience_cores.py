"""Circuit breaker, outlier detector, retry decisions, retry budget and fault injection: table
tests over the pure cores, time and randomness injected."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from meshd.config.schema import FaultPolicy, OutlierDetection, RetryBudget, RetryPolicy
from meshd.proxy.core.breaker import Admission, CircuitBreaker
from meshd.proxy.core.fault import NO_FAULT, FaultAction, decide_fault, mirrored
from meshd.proxy.core.outlier import Failure, OutlierDetector, admitted
from meshd.proxy.core.retry import Body, condition_met, retry_backoff, retry_verdict, safe_to_repeat
from meshd.proxy.core.retry import RetryBudget as Budget
from meshd.registry.model import Endpoint

# -- circuit breaker -------------------------------------------------------------------------


def test_breaker_admits_queues_then_rejects() -> None:
    b = CircuitBreaker(max_connections=2, max_pending=1)
    assert [b.admit() for _ in range(4)] == [
        Admission.ACTIVE, Admission.ACTIVE, Admission.PENDING, Admission.REJECTED]
    assert (b.active, b.pending) == (2, 1)
    assert b.release() is True  # the slot goes to the waiting request
    assert (b.active, b.pending) == (2, 0)
    assert b.admit() is Admission.PENDING
    b.withdraw()  # it gave up
    assert b.release() is False
    assert b.release() is False
    assert (b.active, b.pending) == (0, 0)
    assert "max_connections 2" in b.rejection_reason()


def test_breaker_without_limits_and_with_zero_pending() -> None:
    free = CircuitBreaker()
    assert all(free.admit() is Admission.ACTIVE for _ in range(1000))
    strict = CircuitBreaker(max_connections=1, max_pending=0)
    assert [strict.admit(), strict.admit()] == [Admission.ACTIVE, Admission.REJECTED]


def test_breaker_reconfigured_keeps_counts() -> None:
    b = CircuitBreaker(max_connections=1, max_pending=5)
    assert [b.admit() for _ in range(3)] == [Admission.ACTIVE, Admission.PENDING,
                                             Admission.PENDING]
    assert b.configure(3, 5) == 2  # raised: both waiting requests go
    assert (b.active, b.pending) == (3, 0)
    assert b.configure(1, 0) == 0  # lowered: slots given are not taken back
    assert b.admit() is Admission.REJECTED
    assert b.release() is False
    assert b.active == 2


# -- outlier detection -----------------------------------------------------------------------

CONFIG = OutlierDetection(consecutive_5xx=3, consecutive_connect_failures=2, interval=10.0,
                          base_ejection_time=30.0, max_ejection_time=100.0,
                          max_ejection_percent=50)


def test_consecutive_5xx_eject_and_a_success_resets_the_run() -> None:
    d = OutlierDetector(CONFIG)
    for status in (500, 503):
        assert d.record("a", status, 0.0, 4) is None
    assert d.record("a", 200, 0.0, 4) is None  # run broken
    assert d.record("a", 502, 1.0, 4) is None
    assert d.record("a", Failure.RESET, 1.0, 4) is None  # resets count like 5xx
    ejection = d.record("a", Failure.TIMEOUT, 2.0, 4)
    assert ejection is not None and (ejection.reason, ejection.duration) == ("5xx", 30.0)
    assert d.is_ejected("a", 31.9) and not d.is_ejected("a", 32.0)  # re-admitted at 2 + 30


def test_connect_failures_have_their_own_run() -> None:
    d = OutlierDetector(CONFIG)
    assert d.record("a", Failure.CONNECT, 0.0, 4) is None
    assert d.record("a", 503, 0.0, 4) is None  # an answer: it connected, connect run over
    assert d.record("a", Failure.CONNECT, 0.0, 4) is None
    ejection = d.record("a", Failure.CONNECT, 0.0, 4)
    assert ejection is not None and ejection.reason == "connect-failure"
    assert d.ejected(1.0) == {"a"}


def test_ejection_time_grows_then_decays_while_back() -> None:
    d = OutlierDetector(CONFIG)

    def eject(at: float) -> float:
        for _ in range(3):
            result = d.record("a", 500, at, 4)
        assert result is not None
        return result.duration

    assert eject(0.0) == 30.0  # back at 30
    assert eject(30.0) == 60.0  # failed again at once: twice as long, back at 90
    assert eject(90.0) == 90.0  # back at 180
    assert eject(180.0) == 100.0  # capped at max_ejection_time, back at 280
    assert d.health("a", 281.0).ejections == 4
    # back for 2 whole intervals (20 s): the multiplier drops by two
    assert d.health("a", 300.0).ejections == 2
    assert eject(300.0) == 90.0


def test_never_more_than_max_ejection_percent() -> None:
    d = OutlierDetector(CONFIG)  # 50 % of 4 endpoints: 2 at most
    for endpoint in ("a", "b", "c"):
        for _ in range(3):
            d.record(endpoint, 500, 0.0, 4)
    assert d.ejected(1.0) == {"a", "b"}
    # c keeps its run and goes out as soon as there is room
    assert d.record("c", 500, 31.0, 4) is not None
    assert d.ejected(31.0) == {"c"}
    # one endpoint of one: 50 % of 1 rounds down to nothing, never ejected
    lone = OutlierDetector(CONFIG)
    assert all(lone.record("x", 500, 0.0, 1) is None for _ in range(10))


def test_outcomes_while_ejected_are_ignored_and_state_is_reported() -> None:
    d = OutlierDetector(CONFIG)
    for _ in range(3):
        d.record("a", 500, 0.0, 4)
    assert d.record("a", 500, 5.0, 4) is None
    health = d.health("a", 10.0)
    assert (health.ejected, health.ejection_remaining, health.ejections, health.reason) == \
        (True, 20.0, 1, "5xx")
    assert d.health("a", 40.0).ejected is False
    assert d.health("unknown", 0.0).ejected is False
    d.forget_except({"b"})
    assert d.ejected(1.0) == frozenset()


def _ep(name: str) -> Endpoint:
    return Endpoint("payments", name, name, "10.0.0.1", 15001, "v1")


def test_admitted_skips_ejected_and_panics_when_all_are() -> None:
    a, b = _ep("a"), _ep("b")
    assert admitted((a, b), frozenset()) == ((a, b), False)
    assert admitted((a, b), {a.key}) == ((b,), False)
    assert admitted((a, b), {a.key, b.key}) == ((a, b), True)
    assert admitted((), {a.key}) == ((), False)


# -- retries ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("outcome", "retry_on", "expected"), [
    (Failure.CONNECT, ("connect-failure",), True),
    (Failure.RESET, ("connect-failure",), False),
    (Failure.RESET, ("reset",), True),
    (Failure.TIMEOUT, ("timeout",), True),
    (Failure.TIMEOUT, ("5xx",), True),  # no answer at all counts as 5xx
    (Failure.CONNECT, ("gateway-error",), True),
    (500, ("5xx",), True),
    (500, ("gateway-error",), False),
    (504, ("gateway-error",), True),
    (503, ("503",), True),
    (502, ("503",), False),
    (409, ("409",), True),
    (200, ("5xx", "gateway-error"), False),
])
def test_retry_conditions(outcome: int | Failure, retry_on: tuple[str, ...],
                          expected: bool) -> None:
    assert condition_met(outcome, retry_on) is expected


@pytest.mark.parametrize(("method", "body", "outcome", "safe"), [
    ("GET", Body.NONE, 503, True),  # idempotent
    ("PUT", Body.HELD, 503, True),
    ("POST", Body.HELD, 503, True),  # its body is still held
    ("POST", Body.NONE, 503, False),  # neither idempotent nor a held body
    ("POST", Body.NONE, Failure.CONNECT, True),  # nothing reached a server
    ("GET", Body.LOST, Failure.CONNECT, False),  # the body went and was not kept
    ("PUT", Body.LOST, 503, False),
])
def test_safe_to_repeat(method: str, body: Body, outcome: int | Failure, safe: bool) -> None:
    assert safe_to_repeat(method, body, outcome) is safe


def test_retry_verdict_order() -> None:
    policy = RetryPolicy(2, None, ("5xx",))
    assert retry_verdict(policy, 0, 503, "GET", Body.NONE).retry
    assert retry_verdict(policy, 1, 503, "GET", Body.NONE).retry
    assert retry_verdict(policy, 2, 503, "GET", Body.NONE).reason == "2 retries done"
    assert retry_verdict(None, 0, 503, "GET", Body.NONE).reason == "no retries on this route"
    assert "not in retry_on" in retry_verdict(policy, 0, 404, "GET", Body.NONE).reason
    assert "not kept" in retry_verdict(policy, 0, 503, "GET", Body.LOST).reason
    assert "POST" in retry_verdict(policy, 0, 503, "POST", Body.NONE).reason


def test_backoff_grows_and_is_capped() -> None:
    assert retry_backoff(0, 0.0) == pytest.approx(0.0125)
    assert retry_backoff(0, 0.999) < 0.025
    assert retry_backoff(20, 0.999) <= 0.25


def test_retry_budget_ratio_plus_minimum_over_a_window() -> None:
    budget = Budget(RetryBudget(ratio=0.2, min_retries_per_second=0.5))  # 5 per 10 s window
    for _ in range(100):
        budget.record_request(0.0)
    # 5 + 0.2 * 100 = 25 retries may be spent
    assert sum(budget.try_spend(1.0) for _ in range(40)) == 25
    assert not budget.try_spend(9.9)
    # the window slides: the requests and retries of second 0 and 1 are forgotten
    assert budget.available(11.5) == pytest.approx(5.0)
    assert sum(budget.try_spend(11.5) for _ in range(10)) == 5


def test_retry_budget_zero_means_no_retries() -> None:
    budget = Budget(RetryBudget(ratio=0.0, min_retries_per_second=0.0))
    budget.record_request(0.0)
    assert not budget.try_spend(0.0)


# -- fault injection -------------------------------------------------------------------------

def _draws(*values: float) -> Callable[[], float]:
    it: Iterator[float] = iter(values)
    return lambda: next(it)


@pytest.mark.parametrize(("policy", "draws", "expected"), [
    (None, (), NO_FAULT),
    (FaultPolicy(delay=0.5, delay_percent=10.0), (0.05,), FaultAction(0.5, None)),
    (FaultPolicy(delay=0.5, delay_percent=10.0), (0.10,), NO_FAULT),
    (FaultPolicy(abort_status=503, abort_percent=100.0), (0.9999,), FaultAction(None, 503)),
    (FaultPolicy(abort_status=503, abort_percent=0.0), (0.0,), NO_FAULT),
    (FaultPolicy(0.2, 50.0, 500, 50.0), (0.1, 0.2), FaultAction(0.2, 500)),
    (FaultPolicy(0.2, 50.0, 500, 50.0), (0.6, 0.2), FaultAction(None, 500)),
])
def test_fault_decisions(policy: FaultPolicy | None, draws: tuple[float, ...],
                         expected: FaultAction) -> None:
    assert decide_fault(policy, _draws(*draws)) == expected


def test_mirror_percent() -> None:
    assert [mirrored(10.0, d) for d in (0.0, 0.0999, 0.1, 0.5)] == [True, True, False, False]
    assert not mirrored(0.0, 0.0)
    assert mirrored(100.0, 0.99999)
