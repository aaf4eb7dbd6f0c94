"""Signed mesh config: what ``verify`` accepts and refuses, with real certificates of a real CA
directory (``meshd ca init`` / ``issue --operator`` / ``rotate`` as functions)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from meshd.ca.operations import issue_offline, rotate_ca
from meshd.ca.store import CAMaterial, init_ca, load_ca
from meshd.identity import keys
from meshd.identity.certs import TrustBundle
from meshd.identity.signing import (
    SignatureRefused,
    Signed,
    canonical_bytes,
    is_envelope,
    next_version,
    sign,
    verify,
)
from meshd.identity.spiffe import Kind

TD = "mesh.test"
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
TABLE = {"destinations": {"payments": {"split": {"v1": 90, "v2": 10}}}}


def bundle_of(material: CAMaterial) -> TrustBundle:
    return TrustBundle.from_pems(material.trust_domain, [keys.cert_pem(c) for c in
                                                         material.roots()])


class Signer:
    def __init__(self, directory: Path, kind: Kind = Kind.OPERATOR, name: str = "alice",
                 lifetime: timedelta = timedelta(hours=24), now: datetime = T0) -> None:
        _, self.key_pem, self.cert, self.cert_pem = issue_offline(
            directory, kind, name, now=now, lifetime=lifetime, who="test")

    def sign(self, data: Any = TABLE, *, version: int = 1, now: datetime = T0,
             kind: str = "routes", trust_domain: str = TD) -> dict[str, Any]:
        return sign(kind, data, version=version, now=now, trust_domain=trust_domain,
                    key_pem=self.key_pem, cert_pem=self.cert_pem)


@pytest.fixture
def ca(tmp_path: Path) -> CAMaterial:
    return init_ca(tmp_path / "ca", TD, now=T0 - timedelta(days=1))


def check(envelope: Any, material: CAMaterial, *, now: datetime = T0 + timedelta(hours=1),
          denied: tuple[str, ...] = (), in_force: Signed | None = None) -> Signed:
    return verify(envelope, "routes", bundle=bundle_of(material), denied=denied, now=now,
                  in_force=in_force)


def refusal(envelope: Any, material: CAMaterial, **kw: Any) -> str:
    with pytest.raises(SignatureRefused) as info:
        check(envelope, material, **kw)
    return info.value.code


def test_an_operator_signature_verifies_and_names_the_signer(ca: CAMaterial) -> None:
    alice = Signer(ca.directory)
    envelope = alice.sign(version=7)
    assert is_envelope(envelope) and is_envelope(json.loads(json.dumps(envelope)))
    doc = check(envelope, ca)
    assert (doc.data, doc.version, doc.signer, doc.signer_id) == (
        TABLE, 7, "alice", f"spiffe://{TD}/operator/alice")
    assert doc.serial == keys.serial_hex(alice.cert)
    assert doc.summary()["signed_at"] == "2026-06-01T12:00:00.000000Z"


def test_a_table_stays_valid_after_its_signers_certificate_expired(ca: CAMaterial) -> None:
    envelope = Signer(ca.directory, lifetime=timedelta(hours=2)).sign()
    assert check(envelope, ca, now=T0 + timedelta(days=30)).version == 1


def _tampered(envelope: dict[str, Any]) -> dict[str, Any]:
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["data"]["destinations"]["payments"]["split"] = {"v2": 100}
    return {**envelope, "payload": base64.b64encode(canonical_bytes(payload)).decode()}


def _signed_by_a_service(ca: CAMaterial) -> dict[str, Any]:
    """What ``sign`` refuses to make: a service's key signing the table itself."""
    web = Signer(ca.directory, Kind.SERVICE, "web")
    payload = canonical_bytes({"kind": "routes", "trust_domain": TD, "version": 1,
                               "signed_at": "2026-06-01T12:00:00Z",
                               "signer": f"spiffe://{TD}/svc/web", "data": TABLE})
    key = keys.load_private_key_pem(web.key_pem)
    return {"format": "meshd-signed/1", "payload": base64.b64encode(payload).decode(),
            "signature": base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode(),
            "certificates": [web.cert_pem.decode()]}


@pytest.mark.parametrize(("make", "code"), [
    (lambda ca, other: TABLE, "unsigned"),
    (lambda ca, other: {}, "unsigned"),
    (lambda ca, other: "garbage", "unsigned"),
    (lambda ca, other: {"format": "meshd-signed/0"}, "malformed"),
    (lambda ca, other: {**Signer(ca.directory).sign(), "signature": "%%%"}, "malformed"),
    (lambda ca, other: {**Signer(ca.directory).sign(), "certificates": []}, "malformed"),
    (lambda ca, other: _tampered(Signer(ca.directory).sign()), "bad_signature"),
    (lambda ca, other: Signer(other.directory).sign(), "unknown_signer"),
    (lambda ca, other: _signed_by_a_service(ca), "not_an_operator"),
    (lambda ca, other: Signer(ca.directory).sign(kind="policy"), "wrong_kind"),
    (lambda ca, other: Signer(ca.directory).sign(trust_domain="other.test"),
     "foreign_trust_domain"),
    (lambda ca, other: Signer(ca.directory).sign(now=T0 + timedelta(hours=2)),
     "from_the_future"),
    (lambda ca, other: Signer(ca.directory, lifetime=timedelta(minutes=30)).sign(
        now=T0 + timedelta(minutes=45)), "expired"),
])
def test_what_is_refused(ca: CAMaterial, tmp_path: Path, make: Any, code: str) -> None:
    other = init_ca(tmp_path / "other", TD, now=T0 - timedelta(days=1))
    assert refusal(make(ca, other), ca, now=T0 + timedelta(minutes=50)) == code


def test_a_revoked_signer_is_refused(ca: CAMaterial) -> None:
    alice = Signer(ca.directory)
    assert refusal(alice.sign(), ca, denied=(keys.serial_hex(alice.cert),)) == "revoked"


def test_versions_only_grow_and_a_reread_is_not_a_replay(ca: CAMaterial) -> None:
    alice = Signer(ca.directory)
    first = check(alice.sign(version=10), ca)
    assert check(alice.sign(version=10), ca, in_force=first).digest == first.digest
    assert check(alice.sign(version=11), ca, in_force=first).version == 11
    assert refusal(alice.sign(version=9), ca, in_force=first) == "replay"
    other_table = {"destinations": {}}
    assert refusal(alice.sign(other_table, version=10), ca, in_force=first) == "replay"


def test_next_version_is_time_based_and_past_the_one_in_force() -> None:
    assert next_version(T0, None) == int(T0.timestamp() * 1_000_000)
    far_ahead = int(T0.timestamp() * 1_000_000) + 5_000_000
    assert next_version(T0, far_ahead) == far_ahead + 1


def test_signatures_made_during_and_after_a_root_rotation_verify(ca: CAMaterial) -> None:
    before = Signer(ca.directory).sign(version=1)
    rotate_ca(ca.directory, now=T0 + timedelta(minutes=1), who="test")
    rotated = load_ca(ca.directory)
    after = Signer(ca.directory, name="bob", now=T0 + timedelta(minutes=2)).sign(
        version=2, now=T0 + timedelta(minutes=2))
    assert len(json.loads(json.dumps(after))["certificates"]) == 2  # leaf + cross certificate
    for material in (rotated,):
        assert check(before, material).signer == "alice"
        assert check(after, material).signer == "bob"
    # a host that still trusts only the old root verifies the new signer through the chain
    assert check(after, ca).signer == "bob"


def test_signing_needs_the_key_of_an_operator_certificate(ca: CAMaterial) -> None:
    alice, web = Signer(ca.directory), Signer(ca.directory, Kind.SERVICE, "web")
    with pytest.raises(ValueError, match="does not belong"):
        sign("routes", TABLE, version=1, now=T0, trust_domain=TD, key_pem=web.key_pem,
             cert_pem=alice.cert_pem)
    with pytest.raises(ValueError, match="not an operator"):
        web.sign()
