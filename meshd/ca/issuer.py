"""Certificate issuance, pure: keys, a root, leaves from CSRs, the CA's own TLS certificate.

Nothing here reads the clock, the disk or the network. Callers pass ``now`` and lifetimes, so
rotation schedules can be tested with an injected clock; the only impurity is randomness (fresh
keys, random serials), and a serial can be passed in for reproducible tests.

What a leaf looks like (it ignores whatever the CSR asks for except its public key):
exactly one URI SAN ``spiffe://<td>/<kind>/<name>``, CN = name, not a CA, digitalSignature, valid
from ``now - backdate`` for ``lifetime`` (never beyond the root). EKU by kind: services and nodes
serverAuth + clientAuth (a node certificate also serves the admin API over TLS), operators
clientAuth only.

Root rotation is a key rollover in the RFC 4210 way: every root of a trust domain has the same
subject name, and the new root's key is also certified by the old root ("cross" certificate).
That cross certificate is *self-issued* (subject = issuer name), so it does not count against the
roots' ``pathlen:0``: a peer that trusts only the old root verifies leaf -> cross -> old root; a
peer that trusts the new root stops at it. Leaves are served with the cross certificate after
them while the old root is still in the bundle (``Signer.chain``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshd.identity.keys import CURVE_NAME, cert_pem
from meshd.identity.spiffe import Kind, check_trust_domain, spiffe_id_of

ROOT_LIFETIME = timedelta(days=3650)
DEFAULT_LEAF_LIFETIME = timedelta(hours=24)
DEFAULT_BACKDATE = timedelta(minutes=1)


class CSRRejected(ValueError):
    """A CSR the CA will not sign; ``str(exc)`` is a sentence fit for the requester."""


@dataclass(frozen=True)
class Signer:
    """The root key and certificate that sign leaves, and the certificates served after each leaf
    (during a root rotation: the new root certified by the old one)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()


def chain_pem(cert: x509.Certificate, signer: Signer) -> bytes:
    """A leaf followed by what its verifier may need besides its roots (``Signer.chain``)."""
    return cert_pem(cert) + b"".join(cert_pem(c) for c in signer.chain)


def build_root(
    key: ec.EllipticCurvePrivateKey,
    trust_domain: str,
    now: datetime,
    lifetime: timedelta = ROOT_LIFETIME,
    *,
    serial: int | None = None,
) -> x509.Certificate:
    """A self-signed root for ``trust_domain``: CA:TRUE pathlen 0, keyCertSign + cRLSign."""
    name = root_name(trust_domain)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(now - DEFAULT_BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return builder.sign(key, hashes.SHA256())


def root_name(trust_domain: str) -> x509.Name:
    """The subject of every root of ``trust_domain`` (the same across rotations, see above)."""
    check_trust_domain(trust_domain)
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshd"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"meshd root {trust_domain}"),
    ])


def cross_sign(old: Signer, new_root: x509.Certificate, now: datetime) -> x509.Certificate:
    """The new root's name and key certified by the old root: a self-issued CA certificate (same
    subject and issuer name) valid while both roots are. Raises ValueError if the roots do not
    share their name or the old root has expired."""
    if new_root.subject != old.cert.subject:
        raise ValueError("a new root must keep the subject name of the root it replaces")
    not_after = min(new_root.not_valid_after_utc, old.cert.not_valid_after_utc)
    if not_after <= now:
        raise ValueError("the old root has expired; it can no longer certify a successor")
    new_key = new_root.public_key()
    if not isinstance(new_key, ec.EllipticCurvePublicKey):
        raise ValueError("the new root's key is not an EC key")
    old_ski = old.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(new_root.subject)
        .issuer_name(old.cert.subject)
        .public_key(new_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - DEFAULT_BACKDATE, old.cert.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(new_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(old_ski),
            critical=False,
        )
    )
    return builder.sign(old.key, hashes.SHA256())


def check_csr(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    """The CSR's public key, if its self-signature holds and the key is P-256."""
    try:
        public_key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise CSRRejected(f"the CSR's public key cannot be read: {exc}") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        kind = type(public_key).__name__.removeprefix("_").replace("PublicKey", "")
        raise CSRRejected(f"the CSR carries a {kind or 'non-EC'} key; only ECDSA P-256 is accepted")
    if public_key.curve.name != CURVE_NAME:
        raise CSRRejected(
            f"the CSR's key is on curve {public_key.curve.name}; only P-256 (secp256r1) is accepted"
        )
    if not csr.is_signature_valid:
        raise CSRRejected("the CSR's signature does not verify against its own public key")
    return public_key


def load_csr_pem(data: bytes) -> x509.CertificateSigningRequest:
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CSRRejected(f"not a PEM certificate signing request: {exc}") from None


def issue_leaf(
    signer: Signer,
    public_key: ec.EllipticCurvePublicKey,
    *,
    service: str,
    trust_domain: str,
    now: datetime,
    lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
    backdate: timedelta = DEFAULT_BACKDATE,
    serial: int | None = None,
) -> x509.Certificate:
    """A workload certificate for ``service`` binding ``public_key`` to its SPIFFE ID."""
    return issue_identity(
        signer, public_key, kind=Kind.SERVICE, name=service, trust_domain=trust_domain,
        now=now, lifetime=lifetime, backdate=backdate, serial=serial,
    )


def issue_identity(
    signer: Signer,
    public_key: ec.EllipticCurvePublicKey,
    *,
    kind: Kind,
    name: str,
    trust_domain: str,
    now: datetime,
    lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
    backdate: timedelta = DEFAULT_BACKDATE,
    serial: int | None = None,
) -> x509.Certificate:
    """A certificate binding ``public_key`` to ``spiffe://<td>/<kind>/<name>``."""
    spiffe_id = spiffe_id_of(trust_domain, kind, name)
    builder = _leaf_builder(signer, public_key, now, lifetime, backdate, serial,
                            server=kind is not Kind.OPERATOR)
    builder = (
        builder.subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
    )
    return builder.sign(signer.key, hashes.SHA256())


def issue_leaf_from_csr(
    signer: Signer,
    csr: x509.CertificateSigningRequest,
    *,
    service: str,
    trust_domain: str,
    now: datetime,
    lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
    backdate: timedelta = DEFAULT_BACKDATE,
    serial: int | None = None,
) -> x509.Certificate:
    """Check ``csr`` (raises CSRRejected) and issue a leaf for its key; its subject and
    extensions are ignored."""
    public_key = check_csr(csr)
    return issue_leaf(
        signer, public_key, service=service, trust_domain=trust_domain, now=now,
        lifetime=lifetime, backdate=backdate, serial=serial,
    )


def issue_server_cert(
    signer: Signer,
    public_key: ec.EllipticCurvePublicKey,
    *,
    hosts: Iterable[str],
    now: datetime,
    lifetime: timedelta,
    backdate: timedelta = DEFAULT_BACKDATE,
) -> x509.Certificate:
    """The CA API's own TLS certificate: DNS/IP SANs for ``hosts``, serverAuth only.

    It deliberately carries no SPIFFE ID, and workload leaves carry no DNS/IP SANs, so a service's
    key can never pass a client's hostname check for the CA.
    """
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if not names:
        raise ValueError("the CA's server certificate needs at least one host name or address")
    builder = _leaf_builder(signer, public_key, now, lifetime, backdate, None, client=False)
    builder = (
        builder.subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshd ca")]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
    )
    return builder.sign(signer.key, hashes.SHA256())


def _leaf_builder(
    signer: Signer,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime,
    lifetime: timedelta,
    backdate: timedelta,
    serial: int | None,
    *,
    client: bool = True,
    server: bool = True,
) -> x509.CertificateBuilder:
    if lifetime <= timedelta(0):
        raise ValueError("certificate lifetime must be positive")
    not_before = max(now - backdate, signer.cert.not_valid_before_utc)
    not_after = min(now + lifetime, signer.cert.not_valid_after_utc)
    if not_after <= now:
        raise ValueError("the root certificate has expired; no leaf can be issued")
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    issuer_ski = signer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .issuer_name(signer.cert.subject)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
    )


def _key_usage(*, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )

