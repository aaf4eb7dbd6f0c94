"""The CA's ledger, pure: who may renew, revocation and the deny list, what still depends on a
root, and its JSON form."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from meshd.ca import ledger, tokens
from meshd.ca.ledger import IssuedRecord, Ledger
from meshd.ca.tokens import Refusal
from meshd.identity.spiffe import Kind

NOW = datetime(2030, 6, 1, tzinfo=UTC)
TD = "mesh.test"
OLD, NEW = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def joined(state: Ledger, node: str = "n1", services: tuple[str, ...] = ("web", "cart"),
           root: str = OLD, at: datetime = NOW) -> dict[str, str]:
    """Join ``node`` and issue its first batch; returns serials by what."""
    _, token = tokens.mint(node, services, now=at, ttl=timedelta(hours=1))
    ledger.record_join(state, token, at)
    return issue_batch(state, node, services, root, at)


def issue_batch(state: Ledger, node: str, services: tuple[str, ...], root: str,
                at: datetime) -> dict[str, str]:
    batch = ledger.next_batch(state, node)
    out = {}
    for kind, name in [(Kind.NODE, node), *((Kind.SERVICE, s) for s in services)]:
        serial = format(len(state.issued) + 0x100 + batch * 0x1000, "x")
        ledger.record_issued(state, IssuedRecord(serial, kind, name, node, root, at,
                                                 at + timedelta(hours=24), batch))
        out[f"{kind.value}/{name}"] = serial
    return out


def authorize(state: Ledger, serial: str | None, spiffe: str | None = "spiffe://mesh.test/node/n1",
              now: datetime = NOW) -> str:
    grant = ledger.authorize_renewal(
        state, trust_domain=TD, peer_ids=None if spiffe is None else [spiffe],
        peer_serial=serial, peer_not_after=NOW + timedelta(hours=24), now=now)
    return grant.code if isinstance(grant, Refusal) else "ok"


def test_who_may_renew() -> None:
    state = Ledger()
    serials = joined(state)
    node_cert = serials["node/n1"]
    assert authorize(state, node_cert) == "ok"
    assert authorize(state, None, None) == "no_client_certificate"
    assert authorize(state, serials["svc/web"], "spiffe://mesh.test/svc/web") == \
        "not_a_node_certificate"
    assert authorize(state, node_cert, "spiffe://other.test/node/n1") == "foreign_trust_domain"
    assert authorize(state, node_cert, "spiffe://mesh.test/node/n2") == "unknown_node"
    assert authorize(state, "ffff", "spiffe://mesh.test/node/n1") == "unknown_certificate"
    assert authorize(state, node_cert, "https://mesh.test/node/n1") == "wrong_identity"
    assert authorize(state, node_cert, now=NOW + timedelta(days=2)) == "certificate_expired"
    node = state.nodes["n1"]
    assert ledger.refuse_services(node, ["web", "cart"]) is None
    refusal = ledger.refuse_services(node, ["web", "billing"])
    assert refusal is not None and refusal.code == "service_not_allowed"
    assert "'billing'" in refusal.reason


def test_revoking_a_node_denies_its_live_certificates_and_its_renewals() -> None:
    state = Ledger()
    n1 = joined(state)
    n2 = joined(state, "n2", ("web",))
    version = state.denylist_version
    done = ledger.revoke_node(state, "n1", NOW + timedelta(minutes=5))
    assert {r.serial for r in done} == set(n1.values())
    assert ledger.denylist(state, NOW) == sorted(n1.values())
    assert state.denylist_version == version + 1
    assert authorize(state, n1["node/n1"]) == "certificate_revoked"
    assert authorize(state, n2["node/n2"], "spiffe://mesh.test/node/n2") == "ok"
    # its old token cannot bring it back; one minted after the revocation can
    _, old = tokens.mint("n1", ["web"], now=NOW, ttl=timedelta(hours=1))
    refusal = ledger.refuse_join(state, old)
    assert refusal is not None and refusal.code == "node_revoked"
    _, fresh = tokens.mint("n1", ["web"], now=NOW + timedelta(hours=1), ttl=timedelta(hours=1))
    assert ledger.refuse_join(state, fresh) is None
    ledger.record_join(state, fresh, NOW + timedelta(hours=1))
    assert state.nodes["n1"].revoked_at is None
    # expired revocations leave the list (an expired certificate is refused anyway)
    assert ledger.denylist(state, NOW + timedelta(hours=25)) == []
    ledger.prune(state, NOW + timedelta(hours=25))
    assert state.revoked == {} and state.issued == {}


def test_revoking_one_serial() -> None:
    state = Ledger()
    serials = joined(state)
    web = serials["svc/web"]
    revocation = ledger.revoke_serial(state, "0x" + web.upper(), NOW)
    assert revocation.serial == web and "serial" in revocation.reason
    assert ledger.revoke_serial(state, web, NOW) == revocation  # twice: the same
    assert ledger.denylist(state, NOW) == [web]
    assert authorize(state, serials["node/n1"]) == "ok"  # the node itself still renews
    with pytest.raises(KeyError):
        ledger.revoke_serial(state, "abcdef", NOW)
    with pytest.raises(ValueError):
        ledger.revoke_serial(state, "not hex", NOW)


def test_what_still_depends_on_a_root() -> None:
    state = Ledger()
    first = joined(state, root=OLD)
    assert {r.serial for r in ledger.depending_on_root(state, OLD, NOW)} == set(first.values())
    # a renewal from the new root: the old batch still counts until the node confirms the new
    # one (authenticates with its node certificate)
    second = issue_batch(state, "n1", ("web", "cart"), NEW, NOW + timedelta(hours=12))
    assert len(ledger.depending_on_root(state, OLD, NOW)) == 3
    assert ledger.confirm(state, "n1", second["node/n1"])
    assert not ledger.confirm(state, "n1", second["node/n1"])  # once
    assert not ledger.confirm(state, "n1", first["svc/web"])   # a service certificate: no
    assert ledger.depending_on_root(state, OLD, NOW) == []
    assert len(ledger.depending_on_root(state, NEW, NOW)) == 3
    # offline certificates (operators) count until they expire or are revoked
    ledger.record_issued(state, IssuedRecord("77", Kind.OPERATOR, "alice", None, OLD, NOW,
                                             NOW + timedelta(hours=1)))
    assert [r.name for r in ledger.depending_on_root(state, OLD, NOW)] == ["alice"]
    ledger.revoke_serial(state, "77", NOW)
    assert ledger.depending_on_root(state, OLD, NOW) == []


def test_json_round_trip() -> None:
    state = Ledger()
    joined(state)
    ledger.revoke_node(state, "n1", NOW)
    lines = [ledger.issued_from_json(ledger.issued_to_json(r)) for r in state.issued.values()]
    again = ledger.from_json(ledger.to_json(state), lines)
    assert again == state


def test_a_renewal_request_applies_to_node_certificates_issued_before_it_by_its_root() -> None:
    state = Ledger()
    first = joined(state, "n1", root=OLD)
    second = joined(state, "n2", root=NEW, at=NOW + timedelta(minutes=1))
    assert ledger.renewal_asked(state, first["node/n1"]) is None  # nothing asked yet
    state.renewal = ledger.RenewalRequest(before=NOW + timedelta(minutes=5), root=OLD,
                                          spread_seconds=30.0, requested_at=NOW, who="test")
    assert ledger.renewal_asked(state, first["node/n1"]) == state.renewal
    assert ledger.renewal_asked(state, first["svc/web"]) is None   # a service certificate
    assert ledger.renewal_asked(state, second["node/n2"]) is None  # the new root already
    assert ledger.renewal_asked(state, "ffff") is None             # unknown serial
    # renewed after the request (from the new root): not asked again
    third = issue_batch(state, "n1", ("web", "cart"), NEW, NOW + timedelta(minutes=6))
    assert ledger.renewal_asked(state, third["node/n1"]) is None
    # a request naming no root: everything issued before it
    state.renewal = ledger.RenewalRequest(before=NOW + timedelta(minutes=2), root=None,
                                          spread_seconds=0.0, requested_at=NOW)
    assert ledger.renewal_asked(state, second["node/n2"]) is not None
    assert ledger.renewal_asked(state, third["node/n1"]) is None
    lines = [ledger.issued_from_json(ledger.issued_to_json(r)) for r in state.issued.values()]
    assert ledger.from_json(ledger.to_json(state), lines) == state
