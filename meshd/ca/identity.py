"""What the CA hands a host: a trust bundle and one identity (certificate + local key) per
service. Frozen values, built from PEM by pure functions; ``meshd.ca.files`` stores them and
``meshd.ca.client`` fetches them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

from meshd.ca import issuer
from meshd.ca.spiffe import check_trust_domain, parse_spiffe_id, spiffe_ids_from_cert


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
            issuer.cert_pem(cert) for pem in pems for cert in x509.load_pem_x509_certificates(pem)
        )
        if not roots:
            raise ValueError("trust bundle has no root certificate")
        return cls(trust_domain, roots)

    def certificates(self) -> list[x509.Certificate]:
        return [x509.load_pem_x509_certificate(pem) for pem in self.roots_pem]

    def fingerprints(self) -> tuple[str, ...]:
        return tuple(issuer.fingerprint(cert) for cert in self.certificates())

    def pem(self) -> bytes:
        """All roots concatenated, as ``ssl.SSLContext.load_verify_locations(cadata=...)`` and
        ``ca.crt`` files take them."""
        return b"".join(self.roots_pem)


@dataclass(frozen=True)
class Identity:
    """One service's workload certificate and its private key (which never left this host)."""

    service: str
    spiffe_id: str
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    serial: str
    not_before: datetime
    not_after: datetime

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> Identity:
        """Build from a leaf and its key; raises ValueError if they do not belong together or the
        certificate is not a meshd service certificate."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = issuer.load_private_key_pem(key_pem)
        if not issuer.same_public_key(key.public_key(), cert.public_key()):
            raise ValueError("the private key does not match the certificate")
        ids = spiffe_ids_from_cert(cert)
        if len(ids) != 1:
            raise ValueError(f"expected exactly one SPIFFE ID in the certificate, found {ids}")
        _, service = parse_spiffe_id(ids[0])
        return cls(
            service=service,
            spiffe_id=ids[0],
            cert_pem=issuer.cert_pem(cert),
            key_pem=key_pem,
            serial=issuer.serial_hex(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    @property
    def trust_domain(self) -> str:
        return parse_spiffe_id(self.spiffe_id)[0]

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


@dataclass(frozen=True)
class JoinResult:
    """What a successful join returns: the verified bundle and an identity per service."""

    trust_domain: str
    bundle: TrustBundle
    identities: Mapping[str, Identity]

