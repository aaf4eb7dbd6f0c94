"""Circuit breaking by counting: connection and pending-request limits of one destination. Pure.

A request asks for a connection slot (``admit``). Below ``max_connections`` it gets one at once
(``Admission.ACTIVE``); otherwise it may wait in line while fewer than ``max_pending_requests``
are waiting (``PENDING``); beyond that it is refused (``REJECTED``) and answered 503 at once, so
a slow destination makes callers fail fast instead of queueing without end. ``release`` frees a
slot and says whether it went straight to the longest-waiting request; the trio shell owns the
waiting itself (``meshd.proxy.destinations``).

The limits may change while requests hold slots (a new route table): counts are kept, the new
limits apply to the next admissions, and lowering a limit never revokes a slot already given.
"""

from __future__ import annotations

from enum import Enum


class Admission(Enum):
    ACTIVE = "active"
    PENDING = "pending"
    REJECTED = "rejected"


class CircuitBreaker:
    def __init__(self, max_connections: int | None = None,
                 max_pending: int | None = None) -> None:
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.active = 0
        self.pending = 0

    def configure(self, max_connections: int | None, max_pending: int | None) -> int:
        """New limits; returns how many waiting requests may now proceed (a raised limit)."""
        self.max_connections = max_connections
        self.max_pending = max_pending
        promoted = 0
        while self.pending and self._room():
            self.pending -= 1
            self.active += 1
            promoted += 1
        return promoted

    def _room(self) -> bool:
        return self.max_connections is None or self.active < self.max_connections

    def admit(self) -> Admission:
        if self._room():
            self.active += 1
            return Admission.ACTIVE
        limit = self.max_pending
        if limit is None or self.pending < limit:
            self.pending += 1
            return Admission.PENDING
        return Admission.REJECTED

    def release(self) -> bool:
        """A slot is given back. True: it went to the longest-waiting request (which is now
        active), so the caller must wake it."""
        self.active -= 1
        if self.pending and self._room():
            self.pending -= 1
            self.active += 1
            return True
        return False

    def withdraw(self) -> None:
        """A waiting request gave up (timed out or cancelled) before getting a slot."""
        self.pending -= 1

    def rejection_reason(self) -> str:
        return (f"circuit breaker open: {self.active} connections in use "
                f"(max_connections {self.max_connections}) and {self.pending} requests "
                f"waiting (max_pending_requests {self.max_pending})")
