"""The renewal schedule, a pure function of a certificate's lifetime, a random draw and now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from meshd.identity import schedule
from meshd.identity.schedule import CertState, Wakeup

T0 = datetime(2030, 1, 1, tzinfo=UTC)
DAY = timedelta(hours=24)


@pytest.mark.parametrize(("rand", "fraction"), [(0.0, 0.5), (0.5, 0.6), (0.999999, 0.7),
                                                (-1.0, 0.5), (7.0, 0.7)])
def test_renewal_point_is_between_half_and_seventy_percent(rand: float, fraction: float) -> None:
    at = schedule.renew_at(T0, T0 + DAY, rand)
    assert abs((at - T0) / DAY - fraction) < 1e-5


def test_renewal_points_spread_over_the_window() -> None:
    points = {schedule.renew_at(T0, T0 + DAY, i / 100) for i in range(100)}
    assert len(points) == 100
    assert min(points) == T0 + DAY / 2 and max(points) < T0 + DAY * 0.7


def test_warning_at_twenty_percent_left() -> None:
    assert schedule.warn_at(T0, T0 + DAY) == T0 + DAY * 0.8


@pytest.mark.parametrize(
    ("at", "expected"),
    [(-timedelta(seconds=1), CertState.NOT_YET_VALID), (timedelta(0), CertState.VALID),
     (DAY * 0.59, CertState.VALID), (DAY * 0.6, CertState.RENEWAL_DUE),
     (DAY * 0.8, CertState.EXPIRING), (DAY - timedelta(seconds=1), CertState.EXPIRING),
     (DAY, CertState.EXPIRED)],
)
def test_states_over_a_lifetime(at: timedelta, expected: CertState) -> None:
    renewal = schedule.renew_at(T0, T0 + DAY, 0.5)
    assert schedule.state(T0, T0 + DAY, renewal, T0 + at) is expected


def test_retry_backoff_doubles_up_to_a_cap_scaled_to_the_lifetime() -> None:
    now = T0 + DAY * 0.6
    delays = [schedule.retry_delay(n, 1.0, not_before=T0, not_after=T0 + DAY, now=now)
              for n in range(15)]
    assert delays[0] == timedelta(seconds=1)
    assert delays[1] == timedelta(seconds=2) and delays[4] == timedelta(seconds=16)
    assert max(delays) == timedelta(minutes=5) == delays[-1]
    # equal jitter: never below half
    low = schedule.retry_delay(3, 0.0, not_before=T0, not_after=T0 + DAY, now=now)
    assert low == timedelta(seconds=4)
    # a one-minute certificate (tests, demos) retries quickly
    minute = [schedule.retry_delay(n, 1.0, not_before=T0, not_after=T0 + timedelta(minutes=1),
                                   now=T0 + timedelta(seconds=36)) for n in range(10)]
    assert minute[0] == timedelta(seconds=0.6) and max(minute) == timedelta(seconds=3)


def test_retries_never_wait_past_the_expiry() -> None:
    not_after = T0 + DAY
    for left in (timedelta(minutes=4), timedelta(seconds=20), timedelta(seconds=1)):
        delay = schedule.retry_delay(20, 1.0, not_before=T0, not_after=not_after,
                                     now=not_after - left)
        assert delay <= max(left / 4, timedelta(seconds=0.5))
    # after expiry it keeps trying at the capped pace: a late renewal still brings it back
    late = schedule.retry_delay(20, 1.0, not_before=T0, not_after=not_after,
                                now=not_after + timedelta(hours=1))
    assert late == timedelta(minutes=5)


def test_next_wakeup_orders_renewal_warning_and_expiry() -> None:
    renewal, warn, expiry = T0 + DAY * 0.6, T0 + DAY * 0.8, T0 + DAY

    def wake(now: datetime, retry: datetime | None = None) -> Wakeup:
        return schedule.next_wakeup(now=now, renewal=renewal, warn=warn, expiry=expiry,
                                    retry_at=retry)

    assert wake(T0) == Wakeup(renewal, True)
    assert wake(renewal) == Wakeup(renewal, True)  # due now
    # a failed renewal retries at its own time; the warning and the expiry still wake us
    assert wake(renewal, retry=T0 + DAY * 0.7) == Wakeup(T0 + DAY * 0.7, True)
    assert wake(renewal, retry=T0 + DAY * 0.85) == Wakeup(warn, False)
    assert wake(T0 + DAY * 0.9, retry=T0 + DAY * 1.1) == Wakeup(expiry, False)
    assert wake(T0 + DAY * 1.05, retry=T0 + DAY * 1.1) == Wakeup(T0 + DAY * 1.1, True)


def test_a_renewal_asked_by_the_ca_is_spread_and_bounded() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    spread = timedelta(seconds=30)
    assert schedule.asked_renewal_at(now, spread, 0.0) == now
    assert schedule.asked_renewal_at(now, spread, 0.5) == now + timedelta(seconds=15)
    assert schedule.asked_renewal_at(now, spread, 1.5) == now + spread
    assert schedule.asked_renewal_at(now, timedelta(days=3), 1.0) == now + timedelta(hours=1)
    assert schedule.asked_renewal_at(now, -spread, 0.7) == now
    # it brings the renewal forward, never later, and a retry after a failure still rules
    renewal, warn, expiry = (now + timedelta(hours=h) for h in (12, 19, 24))
    asked = now + timedelta(seconds=20)
    assert schedule.next_wakeup(now=now, renewal=renewal, warn=warn, expiry=expiry,
                                retry_at=None, asked=asked) == schedule.Wakeup(asked, True)
    assert schedule.next_wakeup(now=now, renewal=asked, warn=warn, expiry=expiry, retry_at=None,
                                asked=renewal) == schedule.Wakeup(asked, True)
    retry = now + timedelta(minutes=2)
    assert schedule.next_wakeup(now=now, renewal=renewal, warn=warn, expiry=expiry,
                                retry_at=retry, asked=asked) == schedule.Wakeup(retry, True)
