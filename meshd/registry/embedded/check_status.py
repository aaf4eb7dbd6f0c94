"""When a run of an HTTP/TCP check changes the check's status (docs/consul-api.md §5.4). Pure.

A check flips to passing (or warning) only after ``SuccessBeforePassing`` consecutive good runs,
to warning after ``FailuresBeforeWarning`` and to critical after ``FailuresBeforeCritical``
consecutive failures; until a threshold is reached the check keeps its status and output. An
unset ``FailuresBeforeWarning`` takes the value of ``FailuresBeforeCritical``, so a check does not
pass through warning unless asked to.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshd.registry.embedded.store.records import CRITICAL, PASSING, WARNING


@dataclass
class StatusGate:
    success_before_passing: int = 0
    failures_before_warning: int = 0
    failures_before_critical: int = 0
    successes: int = 0
    failures: int = 0

    def __post_init__(self) -> None:
        if self.failures_before_warning == 0:
            self.failures_before_warning = self.failures_before_critical

    def record(self, status: str) -> str | None:
        """The status to report after a run that ended in ``status``, or None: no change yet."""
        if status in (PASSING, WARNING):
            self.successes += 1
            self.failures = 0
            return status if self.successes >= self.success_before_passing else None
        self.successes = 0
        self.failures += 1
        if self.failures >= self.failures_before_critical:
            return CRITICAL
        if self.failures >= self.failures_before_warning:
            return WARNING
        return None


def http_status(code: int) -> str:
    """2xx passing, 429 Too Many Requests warning, anything else critical."""
    if 200 <= code < 300:
        return PASSING
    if code == 429:
        return WARNING
    return CRITICAL
