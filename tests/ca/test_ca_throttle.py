"""Failed joins per source: the pure backoff table, then the CA answering 429 over real TLS."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from ca_testing import post_join
from test_ca_server import do_join, mint

from meshd.ca import audit
from meshd.ca.server import CAEndpoint
from meshd.ca.store import CAMaterial
from meshd.ca.throttle import JoinThrottle
from meshd.identity.ca_client import CARefusedError


def test_free_failures_then_doubling_blocks_up_to_the_cap() -> None:
    t = JoinThrottle(free_failures=3, first_block=1.0, max_block=4.0, forget_after=100.0)
    assert [t.failed("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert t.retry_after("a", 0.0) == 0.0
    assert t.failed("a", 0.0) == 1.0          # the 4th failure closes for 1 s
    assert t.retry_after("a", 0.5) == 0.5
    assert t.retry_after("b", 0.5) == 0.0      # per source
    assert [t.failed("a", 1.0) for _ in range(3)] == [2.0, 4.0, 4.0]  # doubling, capped
    assert t.retry_after("a", 3.0) == 2.0


@pytest.mark.parametrize(("events", "at", "expected"), [
    ([("fail", 0.0)] * 4 + [("ok", 1.0)], 1.0, 0.0),          # a success clears the source
    ([("fail", 0.0)] * 4, 50.0, 0.0),                          # a block ends
    ([("fail", 0.0)] * 4 + [("fail", 99.0)], 99.5, 1.5),       # not yet forgotten at 99 s
    ([("fail", 0.0)] * 4 + [("fail", 100.0)], 100.0, 0.0),     # forgotten: counting restarts
])
def test_success_and_quiet_time_clear_a_source(events: list[tuple[str, float]], at: float,
                                              expected: float) -> None:
    t = JoinThrottle(free_failures=3, first_block=1.0, max_block=4.0, forget_after=100.0)
    for what, when in events:
        if what == "fail":
            t.failed("a", when)
        else:
            t.succeeded("a")
    assert t.retry_after("a", at) == expected


def test_the_table_is_bounded() -> None:
    t = JoinThrottle(max_sources=3)
    for i in range(10):
        t.failed(f"10.0.0.{i}", 0.0)
    assert len(t) == 3
    t.failed("10.0.0.9", 0.0)
    t.failed("10.0.0.10", 0.0)  # evicts the source idle longest (10.0.0.7), keeps .9
    assert len(t) == 3 and t.failed("10.0.0.9", 0.0) == 0.0


async def test_token_guessing_is_answered_429_without_touching_the_audit_log(
    ca: CAMaterial, ca_server: CAEndpoint
) -> None:
    guess = "deadbeef." + "A" * 43
    for _ in range(6):  # five free failures; the sixth closes the address
        with pytest.raises(CARefusedError) as info:
            await do_join(ca_server, guess)
        assert (info.value.status, info.value.code) == (401, "invalid_token")
    lines = len(audit.read(ca.directory))
    assert audit.read(ca.directory)[-1]["code"] == "too_many_attempts"
    for _ in range(20):
        r = await post_join(ca_server, ca, {"token": guess, "node": "n1", "csrs": {}})
        assert r.status_code == 429
        assert r.json()["error"] == "too_many_attempts"
        assert 1 <= int(r.headers["Retry-After"]) <= 300
    assert len(audit.read(ca.directory)) == lines  # blocked guesses cost no audit line
    # a genuine token from the same address waits too (the address is closed, not the token)
    with pytest.raises(CARefusedError) as info:
        await do_join(ca_server, mint(ca))
    assert info.value.status == 429


def test_the_audit_log_rotates_and_keeps_a_bounded_number_of_files(tmp_path: Path) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(40):
        audit.append(tmp_path, [audit.event("issue", now=now, who="test", what=f"n{i}")],
                     max_bytes=300, keep=2)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    assert all((tmp_path / f).stat().st_size <= 300 + 100 for f in files)
    kept = [r["what"] for r in audit.read(tmp_path, keep=2)]
    assert kept == [f"n{i}" for i in range(40 - len(kept), 40)]  # the newest, in order
    assert oct((tmp_path / "audit.log").stat().st_mode & 0o777) == "0o600"
