"""What the CA hands a host: a trust bundle, one identity (certificate + local key) per service,
and the node's own identity. Frozen values, built from PEM by pure functions;
``meshd.identity.files``
stores them and ``meshd.identity.ca_client`` fetches them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

from meshd.identity import keys
from meshd.identity.spiffe import Kind, check_trust_domain, parse_identity, spiffe_ids_from_cert


@dataclass(frozen=True)
class TrustBundle:
    """The roots a trust domain's certificates chain to (PEM, one certificate each)."""

    trust_domain: str
    roots_pem: tuple[bytes, ...]

    @classmethod
    def from_pems(cls, trust_domain: str, pems: Iterable[bytes]) -> TrustBundle:
        """Validate and normalise to one PEM per root (an entry may hold several, as a ``ca.crt``
        file does). Raises ValueError."""
        check_trust_domain(trust_domain)
        roots = tuple(
            keys.cert_pem(cert) for pem in pems for cert in x509.load_pem_x509_certificates(pem)
        )
        if not roots:
            raise ValueError("trust bundle has no root certificate")
        return cls(trust_domain, roots)

    def certificates(self) -> list[x509.Certificate]:
        return [x509.load_pem_x509_certificate(pem) for pem in self.roots_pem]

    def fingerprints(self) -> tuple[str, ...]:
        return tuple(keys.fingerprint(cert) for cert in self.certificates())

    def pem(self) -> bytes:
        """All roots concatenated, as ``ssl.SSLContext.load_verify_locations(cadata=...)`` and
        ``ca.crt`` files take them."""
        return b"".join(self.roots_pem)


@dataclass(frozen=True)
class Identity:
    """One certificate (a service's, or the node's own) and its private key, which never left
    this host. ``cert_pem`` is the leaf followed by any chain certificate the CA added (during a
    root rotation, the new root certified by the old); ``service`` is the name in the SPIFFE ID
    (the node name for a node identity)."""

    service: str
    spiffe_id: str
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    serial: str
    not_before: datetime
    not_after: datetime
    kind: Kind = Kind.SERVICE

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, kind: Kind = Kind.SERVICE) -> Identity:
        """Build from a leaf (and chain) and its key; raises ValueError if they do not belong
        together or the certificate is not a meshd certificate of ``kind``."""
        certs = x509.load_pem_x509_certificates(cert_pem)
        if not certs:
            raise ValueError("no certificate in the PEM data")
        cert = certs[0]
        key = keys.load_private_key_pem(key_pem)
        if not keys.same_public_key(key.public_key(), cert.public_key()):
            raise ValueError("the private key does not match the certificate")
        ids = spiffe_ids_from_cert(cert)
        if len(ids) != 1:
            raise ValueError(f"expected exactly one SPIFFE ID in the certificate, found {ids}")
        _, found, name = parse_identity(ids[0])
        if found is not kind:
            raise ValueError(f"{ids[0]} is not a {kind.value} identity")
        return cls(
            service=name,
            spiffe_id=ids[0],
            cert_pem=b"".join(keys.cert_pem(c) for c in certs),
            key_pem=key_pem,
            serial=keys.serial_hex(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            kind=kind,
        )

    @property
    def name(self) -> str:
        return self.service

    @property
    def trust_domain(self) -> str:
        return parse_identity(self.spiffe_id)[0]

    def certificate(self) -> x509.Certificate:
        """The leaf (the first certificate of ``cert_pem``)."""
        return x509.load_pem_x509_certificate(self.cert_pem)

    def valid_at(self, now: datetime) -> bool:
        return self.not_before <= now < self.not_after


@dataclass(frozen=True)
class JoinResult:
    """What a successful join or renewal returns: the verified bundle, an identity per service
    and the node's identity (what it renews with from then on)."""

    trust_domain: str
    bundle: TrustBundle
    identities: Mapping[str, Identity]
    node: Identity

