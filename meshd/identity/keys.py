"""Keys and certificates as bytes and back, shared by the CA and the hosts: P-256 keys, PEM,
fingerprints, serials and the one signature check a host makes. Pure (the only impurity is a
fresh key's randomness)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

CURVE_NAME = "secp256r1"


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (CPU-bound for a few milliseconds; shells run it in a thread)."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse an unencrypted PEM key; raises ValueError unless it is an EC P-256 key."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE_NAME:
        raise ValueError("private key is not an ECDSA P-256 key")
    return key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:<64 hex>`` of the DER certificate: how meshd.toml pins the CA."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def same_public_key(a: ec.EllipticCurvePublicKey, b: object) -> bool:
    if not isinstance(b, ec.EllipticCurvePublicKey):
        return False
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(serialization.Encoding.DER, fmt) == b.public_bytes(
        serialization.Encoding.DER, fmt
    )


def verify_issued_by(cert: x509.Certificate, roots: Iterable[x509.Certificate]) -> bool:
    """Whether one of ``roots`` signed ``cert`` (signature and issuer name; no time check)."""
    for root in roots:
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False
