"""Retry decisions and the retry budget. Pure.

Whether a failed try is tried again (``retry_verdict``) depends on four things, checked in order:

1. the route has retries and tries are left (``attempts`` counts retries, Istio's meaning);
2. the outcome is one the route retries on (``RETRY_CONDITIONS`` or a status code):

   ================  =======================================================================
   connect-failure   no connection could be made (refused, unreachable, TLS refused, timeout)
   reset             the connection broke before a response head arrived
   timeout           the per-try timeout passed before a response head arrived
   5xx               any 5xx answer, or no answer at all (the three above)
   gateway-error     a 502, 503 or 504 answer, or no answer at all
   "503" (etc.)      that status
   ================  =======================================================================

3. the request is safe to repeat: the whole request can be sent again (no body, or everything
   read of it is still held — bodies up to ``REPLAY_LIMIT`` are kept while they stream up), and
   either the method is idempotent or the body was held (a body-less POST is not repeated); a
   connect failure is always safe, as nothing reached a server;
4. the destination's retry budget has a retry to spare.

A request that never reached an app — no connection to the peer meshd, or the peer meshd's
answer that it could not connect to its app (a 503 with ``x-meshd-error: app-connect-*``, a
connect failure for every decision here: ``core.attempt.peer_failure``) — is tried again on up to
``IMPLICIT_RETRIES.attempts`` (2) endpoints it has not tried yet (``fresh``), whatever the route
declares: on a route without retries (``route_retries``: ``IMPLICIT_RETRIES``, Istio's default
of 2 retries on connect failures), and as a floor under declared ones (which keep their meaning
for everything else, and may add retries on top; ``attempts = 0`` turns even these off). Such a
retry is safe for any method — nothing reached an app — as long as the body is still held; it
spends the retry budget like any retry.

The budget (``RetryBudget``) is Finagle's and Linkerd's: over a sliding 10 s window, retries may
reach ``ratio`` times the requests plus ``min_retries_per_second`` times the window. When a
destination fails as a whole, retries then add at most ``ratio`` to its load instead of
multiplying it by ``attempts``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from meshd.backoff import backoff_delay
from meshd.config.schema import RetryBudget as RetryBudgetConfig
from meshd.config.schema import RetryPolicy
from meshd.proxy.core.outlier import Failure, Outcome

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
REPLAY_LIMIT = 64 * 1024  # request bodies up to this size are kept for a retry or a mirror
BUDGET_WINDOW = 10  # seconds, in one-second buckets
BACKOFF_BASE = 0.025
BACKOFF_CAP = 0.25


class Body(Enum):
    """Where a request's body stands for a repeat."""

    NONE = "none"  # the request has no body
    HELD = "held"  # everything read of it so far is held (or nothing was read yet)
    LOST = "lost"  # part of it went upstream and was not kept: it cannot be sent again


def condition_met(outcome: Outcome, retry_on: tuple[str, ...]) -> bool:
    """Whether ``outcome`` is one of the ``retry_on`` conditions (table in the module doc)."""
    for condition in retry_on:
        if isinstance(outcome, Failure):
            if condition in ("5xx", "gateway-error") or condition == outcome.value:
                return True
        elif condition == "5xx":
            if 500 <= outcome <= 599:
                return True
        elif condition == "gateway-error":
            if outcome in (502, 503, 504):
                return True
        elif condition.isdigit() and int(condition) == outcome:
            return True
    return False


def safe_to_repeat(method: str, body: Body, outcome: Outcome) -> bool:
    if body is Body.LOST:
        return False
    if outcome is Failure.CONNECT:
        return True
    return method in IDEMPOTENT_METHODS or body is Body.HELD


@dataclass(frozen=True)
class Verdict:
    retry: bool
    reason: str  # why not, in words (empty when retrying)


# What a route without declared retries retries: only what never reached an app.
IMPLICIT_RETRIES = RetryPolicy(2, None, ("connect-failure",))


def route_retries(declared: RetryPolicy | None) -> RetryPolicy:
    """The retries an outbound request gets: the route's, else ``IMPLICIT_RETRIES``."""
    return declared if declared is not None else IMPLICIT_RETRIES


def retry_verdict(policy: RetryPolicy | None, retries_done: int, outcome: Outcome,
                  method: str, body: Body, *, status: int = 0, fresh: bool = True) -> Verdict:
    """Whether to retry after ``outcome``, budget aside (the caller spends it last).
    ``status``: the answer a failure came as (a peer meshd's 503 for its app's connect
    failure: ``retry_on = ["503"]`` matches it too); ``fresh``: an endpoint not yet tried
    (and not ejected) is left."""
    if policy is None or policy.attempts == 0:
        return Verdict(False, "no retries on this route")
    never = outcome is Failure.CONNECT
    if not (never and fresh and retries_done < IMPLICIT_RETRIES.attempts):  # not the floor
        if retries_done >= policy.attempts:
            return Verdict(False, f"{policy.attempts} retries done")
        if not (condition_met(outcome, policy.retry_on)
                or (status and condition_met(status, policy.retry_on))):
            return Verdict(False, f"{outcome} is not in retry_on")
        if policy is IMPLICIT_RETRIES and not fresh:
            return Verdict(False, "no endpoint left that was not tried")
    if not safe_to_repeat(method, body, outcome):
        why = ("its body was not kept" if body is Body.LOST
               else f"{method} without a held body is not safe to repeat")
        return Verdict(False, why)
    return Verdict(True, "")


def retry_backoff(retries_done: int, rand: float) -> float:
    """Seconds to wait before the next retry: 25 ms doubling to 250 ms, jittered."""
    return backoff_delay(retries_done, rand, base=BACKOFF_BASE, cap=BACKOFF_CAP)


class RetryBudget:
    """Requests and retries of one destination over the last ``BUDGET_WINDOW`` seconds."""

    def __init__(self, config: RetryBudgetConfig) -> None:
        self.config = config
        self._buckets: deque[list[int]] = deque()  # [second, requests, retries], oldest first

    def configure(self, config: RetryBudgetConfig) -> None:
        self.config = config

    def _bucket(self, now: float) -> list[int]:
        second = int(now)
        while self._buckets and self._buckets[0][0] <= second - BUDGET_WINDOW:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        return self._buckets[-1]

    def record_request(self, now: float) -> None:
        self._bucket(now)[1] += 1

    def available(self, now: float) -> float:
        """Retries that may still be spent now."""
        self._bucket(now)
        requests = sum(b[1] for b in self._buckets)
        retries = sum(b[2] for b in self._buckets)
        c = self.config
        return c.min_retries_per_second * BUDGET_WINDOW + c.ratio * requests - retries

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is spent."""
        if self.available(now) < 1:
            return False
        self._bucket(now)[2] += 1
        return True
