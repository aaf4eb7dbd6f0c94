"""When a host renews its certificates, retries, warns, and stops using them. Pure.

A certificate is renewed at a random point between 50% and 70% of its lifetime (the jitter spreads
a fleet's renewals, which would otherwise follow a mass join or a CA outage in lockstep), chosen
once per certificate so restarts do not move it much. A failed renewal is retried with capped
exponential backoff until the certificate expires; the delays scale with the lifetime (a 24 h
certificate retries after 1 s, 2 s, 4 s ... up to 5 min; a 60 s test certificate after
0.6 s ... up to 3 s) and never run past the expiry. With 20% of the lifetime left the host warns.
An expired certificate is never presented. When the CA asks a host to renew now (the operator
finishing a root rotation), it renews at a random point within the spread the CA names (at most
``MAX_ASKED_SPREAD``), so a fleet asked at once reaches the CA spread out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

RENEW_FROM = 0.5
RENEW_TO = 0.7
WARN_LEFT = 0.2
FIRST_RETRY = timedelta(seconds=1)
MAX_RETRY = timedelta(minutes=5)
MAX_ASKED_SPREAD = timedelta(hours=1)


class CertState(StrEnum):
    NOT_YET_VALID = "not_yet_valid"
    VALID = "valid"
    RENEWAL_DUE = "renewal_due"  # past its renewal point: a renewal is being attempted
    EXPIRING = "expiring"        # 20% of the lifetime or less left: warn
    EXPIRED = "expired"


def renew_at(not_before: datetime, not_after: datetime, rand: float) -> datetime:
    """The renewal point for ``rand`` in [0, 1): between 50% and 70% of the lifetime."""
    lifetime = not_after - not_before
    return not_before + lifetime * (RENEW_FROM + (RENEW_TO - RENEW_FROM) * _unit(rand))


def warn_at(not_before: datetime, not_after: datetime) -> datetime:
    """When 20% of the lifetime is left."""
    return not_after - (not_after - not_before) * WARN_LEFT


def state(not_before: datetime, not_after: datetime, renewal: datetime,
          now: datetime) -> CertState:
    if now < not_before:
        return CertState.NOT_YET_VALID
    if now >= not_after:
        return CertState.EXPIRED
    if now >= warn_at(not_before, not_after):
        return CertState.EXPIRING
    if now >= renewal:
        return CertState.RENEWAL_DUE
    return CertState.VALID


def retry_delay(attempt: int, rand: float, *, not_before: datetime, not_after: datetime,
                now: datetime) -> timedelta:
    """How long to wait after the ``attempt``-th failure in a row (0 for the first): doubling
    from ``min(1 s, lifetime/100)`` up to ``min(5 min, lifetime/20)``, with "equal jitter" (half
    fixed, half random), and at most a quarter of the time left before expiry so the last
    attempts still come before it. Past expiry, the capped delay (a late renewal still helps)."""
    lifetime = not_after - not_before
    first = min(FIRST_RETRY, lifetime / 100)
    cap = max(min(MAX_RETRY, lifetime / 20), first)
    base: timedelta = min(cap, first * float(2 ** min(attempt, 30)))
    delay: timedelta = base / 2 + (base / 2) * _unit(rand)
    left = not_after - now
    if left > timedelta(0):
        delay = min(delay, max(left / 4, first / 2))
    return max(delay, timedelta(milliseconds=10))


def asked_renewal_at(now: datetime, spread: timedelta, rand: float) -> datetime:
    """When to renew after the CA asked for it: ``now`` plus ``rand`` of the spread (capped at
    ``MAX_ASKED_SPREAD``; a negative spread counts as none)."""
    bounded = min(max(spread, timedelta(0)), MAX_ASKED_SPREAD)
    return now + bounded * _unit(rand)


@dataclass(frozen=True)
class Wakeup:
    """What the renewal loop does next, and when."""

    at: datetime
    renew: bool  # True: renew at ``at``; False: only look again (warn, expire)


def next_wakeup(*, now: datetime, renewal: datetime, warn: datetime, expiry: datetime,
                retry_at: datetime | None, asked: datetime | None = None) -> Wakeup:
    """The earliest event ahead: the renewal (brought forward to ``asked`` when the CA asked
    for one; after a failure, the retry), the warning, the expiry. A renewal due in the past
    happens now."""
    planned = renewal if asked is None else min(renewal, asked)
    renew_time = retry_at if retry_at is not None else planned
    if renew_time <= now:
        return Wakeup(now, True)
    later = [t for t in (warn, expiry) if t > now]
    if later and min(later) < renew_time:
        return Wakeup(min(later), False)
    return Wakeup(renew_time, True)


def _unit(rand: float) -> float:
    return min(max(rand, 0.0), 1.0)
