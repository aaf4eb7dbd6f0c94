"""The daemon-side certificate manager over whole certificate lifetimes, in virtual time: renewal
at the scheduled point, retries during an outage, the 20% warning, expiry (never presented),
restarts with the node certificate instead of the token."""

from __future__ import annotations

import itertools
import logging
import stat
from datetime import timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from identity_testing import TD, FakeCA, inline, virtual_clock

from meshd.errors import CAError, IdentityError
from meshd.identity import files
from meshd.identity.ca_client import CARefusedError, DenyList, RenewAsked
from meshd.identity.manager import IdentityManager
from meshd.identity.tls import TLSState
from meshd.metrics import Metrics

HOUR = timedelta(hours=1)


def manager(directory: Path, ca: FakeCA, rand: float = 0.5,
            metrics: Metrics | None = None) -> IdentityManager:
    return IdentityManager(directory=directory, trust_domain=TD, services=["web", "cart"],
                           ca=ca, metrics=metrics, clock=ca.clock, rand=lambda: rand,
                           run_blocking=inline)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tls_for(directory: Path, ca: FakeCA) -> TLSState:
    return TLSState(directory, TD, ["web", "cart"], clock=lambda: ca.clock().timestamp())


async def test_renews_at_the_scheduled_point_and_swaps_the_tls_contexts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    ca = FakeCA(virtual_clock())
    metrics = Metrics()
    m = manager(tmp_path, ca, rand=0.5, metrics=metrics)
    _bundle, identities = await m.obtain()
    assert [kind for kind, _ in ca.calls] == ["join"]  # nothing on disk yet: the token
    first = identities["web"]
    tls = tls_for(tmp_path, ca)
    await nursery.start(m.run, tls)

    await m.renewed.wait()
    (renewed_at,) = ca.renewals()
    # rand 0.5 -> 60% of the lifetime
    assert abs((renewed_at - first.not_before) / HOUR - 0.6) < 0.01
    assert tls.generation == 2
    second = m.status.identities["web"]
    assert second.serial != first.serial and second.not_after > first.not_after
    assert files.read_identity(tmp_path, "web") == second
    assert mode(tmp_path) == 0o700
    for key in ("web.key", "cart.key", "_node.key"):
        assert mode(tmp_path / key) == 0o600
    assert metrics.registry.get_sample_value(
        "meshd_cert_expiry_timestamp_seconds", {"service": "web"}) == second.not_after.timestamp()
    assert metrics.registry.get_sample_value("meshd_cert_renewals_total", {"result": "ok"}) == 2

    # and it goes on, lifetime after lifetime
    await m.renewed.wait()
    await m.renewed.wait()
    assert len(ca.renewals()) == 3
    gaps = [b - a for a, b in zip(ca.renewals(), ca.renewals()[1:], strict=False)]
    assert all(abs(g / HOUR - 0.6) < 0.01 for g in gaps)


async def test_outage_retries_with_backoff_warns_and_never_presents_an_expired_certificate(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    ca = FakeCA(virtual_clock())
    m = manager(tmp_path, ca, rand=0.0)
    _, identities = await m.obtain()
    web = identities["web"]
    tls = tls_for(tmp_path, ca)
    await nursery.start(m.run, tls)
    ca.up = False

    # until the 20% mark: retries, still serving
    await trio.sleep((web.not_before + HOUR * 0.79 - ca.clock()).total_seconds())
    attempts = ca.renewals()
    assert attempts[0] - web.not_before == HOUR / 2  # rand 0 -> 50%
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] < gaps[2] < gaps[4]  # backing off
    assert max(gaps) <= timedelta(minutes=3) + timedelta(seconds=1)  # lifetime/20 cap
    tls.client_context("web")  # still presented
    assert "less than 20%" not in caplog.text

    await trio.sleep(HOUR.total_seconds() * 0.02)
    assert "less than 20% of its lifetime left" in caplog.text
    assert m.status.to_json(ca.clock())["certificates"]["web"]["state"] == "expiring"

    # expiry: refused rather than presented
    await trio.sleep((web.not_after - ca.clock()).total_seconds() + 1)
    with pytest.raises(IdentityError, match="expired"):
        tls.client_context("web")
    assert tls.unusable_reason("cart") is not None
    assert "expired at" in caplog.text and "refused until a renewal succeeds" in caplog.text
    assert m.status.to_json(ca.clock())["certificates"]["web"]["state"] == "expired"
    assert m.status.failures >= 10 and "connection refused" in m.status.last_error

    # the CA comes back: the node certificate has expired too, so it joins with the token
    ca.up = True
    with trio.fail_after(600):
        await m.renewed.wait()
    assert ca.calls[-1][0] == "join"
    tls.client_context("web")  # served again
    assert m.status.failures == 0 and m.status.last_error == ""


async def test_a_restart_renews_with_the_node_certificate_not_the_token(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    ca = FakeCA(virtual_clock())
    await manager(tmp_path, ca).obtain()
    ca.token_valid = False  # used up (single use) and expired, as after a reboot days later
    await trio.sleep(600)
    _, identities = await manager(tmp_path, ca).obtain()
    assert [kind for kind, _ in ca.calls] == ["join", "renew"]
    assert identities["web"].not_before == ca.clock()

    # a renewal the CA refuses falls back to the token (an operator may have put a new one)
    ca.refuse_renewals = True
    with pytest.raises(CARefusedError, match="used up"):
        await manager(tmp_path, ca).obtain()
    ca.token_valid = True
    await manager(tmp_path, ca).obtain()
    assert [kind for kind, _ in ca.calls][-2:] == ["renew", "join"]


async def test_a_restart_with_the_ca_down_serves_valid_certificates_from_disk(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca = FakeCA(virtual_clock())
    _, before = await manager(tmp_path, ca).obtain()
    ca.up = False
    m = manager(tmp_path, ca)
    _, identities = await m.obtain()
    assert identities == before
    assert "serving with the certificates on disk" in caplog.text
    # and it keeps trying soon, not only at the scheduled point
    assert m.status.retry_at is not None and m.status.retry_at - ca.clock() < timedelta(seconds=2)
    await nursery.start(m.run, tls_for(tmp_path, ca))
    ca.up = True
    with trio.fail_after(30):
        await m.renewed.wait()
    assert ca.calls[-1][0] == "renew"

    # nothing usable on disk and the CA down: an error (the daemon stays not ready, retrying)
    ca.up = False
    with pytest.raises(CAError, match="cannot reach"):
        await manager(tmp_path / "empty", ca).obtain()


async def test_a_renewal_asked_by_the_ca_comes_within_the_spread_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    ca = FakeCA(virtual_clock())
    m = manager(tmp_path, ca, rand=0.5)
    await m.obtain()
    await nursery.start(m.run, tls_for(tmp_path, ca))
    await trio.sleep(60)
    assert ca.renewals() == []
    node = m.status.node
    assert node is not None
    # asked for another certificate (an answer to a poll made with the previous one): ignored
    ca.deny = DenyList(0, frozenset(), renew=RenewAsked("abc", "2026-01-01T00:00:00Z", 60.0))
    await trio.sleep(10)
    assert ca.renewals() == [] and m.status.asked_at is None
    asked_at = ca.clock()
    ca.deny = DenyList(0, frozenset(), renew=RenewAsked(node.serial, "2026-01-01T00:00:00Z",
                                                        60.0))
    with trio.fail_after(120):
        await m.renewed.wait()
    (renewed_at,) = ca.renewals()
    # rand 0.5: half the 60 s spread after the poll that carried the request (polls every ~2 s),
    # not at 60% of the hour
    assert 30 <= (renewed_at - asked_at).total_seconds() <= 33
    status = m.status.to_json(ca.clock())
    assert status["renewal_asked"] is None
    assert status["last_renewal_reason"].startswith("asked by the CA")
    # the answer still names the old serial: no second renewal
    await trio.sleep(120)
    assert len(ca.renewals()) == 1
