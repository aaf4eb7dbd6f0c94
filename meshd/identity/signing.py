"""Mesh config signed by an operator certificate from the mesh CA, and its verification. Pure.

The route and authorization table lives in the registry, which many hold write access to (or
could steal it). So the table is stored as a signed envelope, and every meshd verifies it
against its trust bundle before applying it: whoever can write the registry can then deny
service (delete or garble the key), but never open a door.

The envelope, as JSON::

    {"format": "meshd-signed/1",
     "payload": "<base64 of the canonical JSON below>",
     "signature": "<base64 ECDSA P-256 / SHA-256 signature of exactly those payload bytes>",
     "certificates": ["<the signer's certificate PEM>", "<chain PEM, during a root rotation>"]}

    payload = {"kind": "routes", "trust_domain": TD, "version": N, "signed_at": RFC 3339,
               "signer": "spiffe://TD/operator/NAME", "data": <the canonical table>}

What ``verify`` accepts:

* a signer certificate with exactly one SPIFFE ID, an operator's of the bundle's trust domain,
  chaining to a root of the bundle (directly, or through the chain certificate a root rotation
  adds), every certificate on the path valid at ``signed_at``, its serial not revoked;
* ``signed_at`` no later than ``now`` plus ``MAX_CLOCK_SKEW`` (a signer cannot date ahead);
* the signature over the payload bytes by the signer's key;
* ``version`` greater than the version in force, or equal to it with the very same payload (a
  watcher reading the same value again). An older or different-but-equal version is a replay.

Validity is judged at ``signed_at``, not now, so a table stays verifiable after its signer's
certificate expires (hosts that start later can still apply it). The price: a stolen operator
key can sign with a back-dated ``signed_at`` until its certificate is revoked; ``version`` only
grows, so once the operator signs a newer table, older-dated forgeries are replays. Versions are
microseconds since the epoch at signing (never less than the version read plus one), so writers
need no counter of their own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from meshd.identity import keys
from meshd.identity.certs import TrustBundle
from meshd.identity.spiffe import (
    Kind,
    NotAnOperator,
    operator_of,
    parse_identity,
    spiffe_ids_from_cert,
)
from meshd.timestamps import format_time_precise, parse_time

FORMAT = "meshd-signed/1"
MAX_CLOCK_SKEW = timedelta(minutes=5)
MAX_CERTIFICATES = 4


class SignatureRefused(ValueError):
    """Why a signed document was not accepted. ``code`` is short and stable (metrics, JSON);
    ``str(exc)`` is a sentence for the operator."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Signed:
    """A verified document: its data and who signed it, when, at which version."""

    kind: str
    version: int
    signed_at: datetime
    signer: str  # the operator's name
    signer_id: str  # the operator's SPIFFE ID
    serial: str  # the signer certificate's serial (hex)
    digest: str  # sha256 of the payload bytes: the same document read twice has the same one
    data: Any

    def summary(self) -> dict[str, Any]:
        """What ``/v1/state`` and the CLI show of the table in force."""
        return {"version": self.version, "signed_at": format_time_precise(self.signed_at),
                "signer": self.signer, "signer_id": self.signer_id, "serial": self.serial}


def canonical_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def next_version(now: datetime, current: int | None) -> int:
    """The version a writer signs with: microseconds since the epoch, past the one in force."""
    stamp = int(now.timestamp() * 1_000_000)
    return max(stamp, (current or 0) + 1)


def sign(kind: str, data: Any, *, version: int, now: datetime, trust_domain: str,
         key_pem: bytes, cert_pem: bytes) -> dict[str, Any]:
    """The envelope of ``data`` signed with an operator's key; ``cert_pem`` is the operator's
    certificate file (the certificate, then any chain certificate). Raises ValueError when the
    key does not belong to the certificate or the certificate is not an operator's."""
    certs = x509.load_pem_x509_certificates(cert_pem)
    key = keys.load_private_key_pem(key_pem)
    if not certs or not keys.same_public_key(key.public_key(), certs[0].public_key()):
        raise ValueError("the key does not belong to the certificate")
    ids = spiffe_ids_from_cert(certs[0])
    if len(ids) != 1 or parse_identity(ids[0])[1] is not Kind.OPERATOR:
        raise ValueError(f"not an operator certificate: {', '.join(ids) or 'no SPIFFE ID'} "
                         "(`meshd ca issue --operator NAME`)")
    payload = canonical_bytes({"kind": kind, "trust_domain": trust_domain, "version": version,
                               "signed_at": format_time_precise(now), "signer": ids[0],
                               "data": data})
    signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    return {"format": FORMAT, "payload": base64.b64encode(payload).decode(),
            "signature": base64.b64encode(signature).decode(),
            "certificates": [keys.cert_pem(c).decode() for c in certs]}


def is_envelope(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def verify(envelope: Any, kind: str, *, bundle: TrustBundle, denied: Iterable[str],
           now: datetime, in_force: Signed | None = None) -> Signed:
    """The verified document, or ``SignatureRefused`` (see the module comment)."""
    if not isinstance(envelope, Mapping) or "format" not in envelope:
        raise SignatureRefused("unsigned", "the document is not signed (no meshd-signed "
                               "envelope): sign it with an operator certificate")
    if envelope.get("format") != FORMAT:
        raise SignatureRefused("malformed", f"unknown envelope format {envelope.get('format')!r}")
    payload, signature, certs = _parts(envelope)
    claims = _claims(payload, kind, bundle.trust_domain)
    signed_at = claims["signed_at"]
    if signed_at > now + MAX_CLOCK_SKEW:
        raise SignatureRefused("from_the_future", f"signed at {format_time_precise(signed_at)}, "
                               "later than this host's clock allows")
    leaf = certs[0]
    signer_id, signer = _operator(leaf, bundle.trust_domain)
    if claims["signer"] != signer_id:
        raise SignatureRefused("malformed", f"payload names signer {claims['signer']}, the "
                               f"certificate is {signer_id}")
    _check_path(leaf, certs[1:], bundle.certificates(), signed_at)
    serial = keys.serial_hex(leaf)
    if serial in set(denied):
        raise SignatureRefused("revoked", f"signed by {signer_id} with certificate {serial}, "
                               "which the CA revoked")
    public_key = leaf.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureRefused("unknown_signer", "the signer's key is not an ECDSA key")
    try:
        public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureRefused("bad_signature", f"the signature by {signer_id} does not match "
                               "the document (altered after signing?)") from None
    doc = Signed(kind=kind, version=claims["version"], signed_at=signed_at, signer=signer,
                 signer_id=signer_id, serial=serial,
                 digest=hashlib.sha256(payload).hexdigest(), data=claims["data"])
    _check_order(doc, in_force)
    return doc


def inspect(envelope: Any, kind: str) -> Signed:
    """What a well-formed envelope claims, NOT verified (no chain, revocation, signature or
    order check): for an operator's display (``meshd routes show``) and for the version a writer
    signs after. ``SignatureRefused`` when it is not a well-formed envelope of ``kind``."""
    if not is_envelope(envelope):
        raise SignatureRefused("unsigned", "the document is not signed (no meshd-signed "
                               "envelope)")
    payload, _, certs = _parts(envelope)
    claims = _claims(payload, kind, None)
    try:
        name = parse_identity(claims["signer"])[2]
    except ValueError as exc:
        raise SignatureRefused("malformed", f"malformed signer: {exc}") from None
    return Signed(kind=kind, version=claims["version"], signed_at=claims["signed_at"],
                  signer=name, signer_id=claims["signer"], serial=keys.serial_hex(certs[0]),
                  digest=hashlib.sha256(payload).hexdigest(), data=claims["data"])


def _parts(envelope: Mapping[str, Any]) -> tuple[bytes, bytes, list[x509.Certificate]]:
    try:
        payload = base64.b64decode(envelope["payload"], validate=True)
        signature = base64.b64decode(envelope["signature"], validate=True)
        pems = envelope["certificates"]
        if not isinstance(pems, list) or not 1 <= len(pems) <= MAX_CERTIFICATES:
            raise ValueError(f"expected 1 to {MAX_CERTIFICATES} certificates")
        certs = [x509.load_pem_x509_certificate(p.encode()) for p in pems]
    except (KeyError, TypeError, AttributeError, ValueError, binascii.Error) as exc:
        raise SignatureRefused("malformed", f"malformed signed envelope: {exc}") from None
    return payload, signature, certs


def _claims(payload: bytes, kind: str, trust_domain: str | None) -> dict[str, Any]:
    """The payload's claims; the trust domain is checked unless ``trust_domain`` is None."""
    try:
        claims = json.loads(payload)
        if not isinstance(claims, dict):
            raise ValueError("payload is not an object")
        claims["signed_at"] = parse_time(claims["signed_at"])
        version = claims["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"bad version {version!r}")
        if not isinstance(claims["signer"], str) or "data" not in claims:
            raise ValueError("signer or data missing")
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureRefused("malformed", f"malformed signed payload: {exc}") from None
    if claims.get("kind") != kind:
        raise SignatureRefused("wrong_kind", f"a signed {claims.get('kind')!r} document where "
                               f"{kind!r} belongs")
    if trust_domain is not None and claims.get("trust_domain") != trust_domain:
        raise SignatureRefused("foreign_trust_domain", f"signed for trust domain "
                               f"{claims.get('trust_domain')!r}, this mesh is {trust_domain!r}")
    return claims


def _operator(leaf: x509.Certificate, trust_domain: str) -> tuple[str, str]:
    ids = spiffe_ids_from_cert(leaf)
    try:
        name = operator_of(ids, trust_domain)
    except NotAnOperator as exc:
        code = "not_an_operator" if exc.code == "wrong_identity" else exc.code
        raise SignatureRefused(code, f"signer {exc}") from None
    return ids[0], name


def _check_path(leaf: x509.Certificate, chain: list[x509.Certificate],
                roots: list[x509.Certificate], at: datetime) -> None:
    """The leaf is issued by a root, or by a chain certificate a root issued; all valid at
    ``at``. Chain certificates are only ever roots' cross certificates, so one step suffices."""
    candidates: list[list[x509.Certificate]] = [[leaf]]
    candidates += [[leaf, link] for link in chain if keys.verify_issued_by(leaf, [link])]
    for path in candidates:
        issuer = next((r for r in roots if keys.verify_issued_by(path[-1], [r])), None)
        if issuer is None:
            continue
        if all(_valid_at(c, at) for c in [*path, issuer]):
            return
        raise SignatureRefused("expired", f"the signer's certificate (or its issuer) was not "
                               f"valid at the signing time {format_time_precise(at)}")
    raise SignatureRefused("unknown_signer", "the signer's certificate is not issued by this "
                           "mesh's CA (no root of the trust bundle signed it)")


def _valid_at(cert: x509.Certificate, at: datetime) -> bool:
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def _check_order(doc: Signed, in_force: Signed | None) -> None:
    if in_force is None:
        return
    if doc.version > in_force.version:
        return
    if doc.version == in_force.version and doc.digest == in_force.digest:
        return
    raise SignatureRefused("replay", f"version {doc.version} signed by {doc.signer_id} is not "
                           f"newer than version {in_force.version} in force: a replayed or "
                           "stale document")
