"""The pure issuance core: what a root and a leaf look like, CSR checks, and that leaves chain to
the root both for ``cryptography``'s verifier and for an OpenSSL (``ssl``) mTLS handshake."""

from __future__ import annotations

import re
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshd.ca import issuer
from meshd.identity import keys
from meshd.identity.certs import Identity
from meshd.identity.files import write_identity
from meshd.identity.spiffe import spiffe_ids_from_cert_der

TD = "mesh.test"
NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def signer() -> issuer.Signer:
    key = keys.new_private_key()
    return issuer.Signer(key, issuer.build_root(key, TD, NOW))


def make_csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
             *, cn: str = "evil", sans: list[x509.GeneralName] | None = None,
             ) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def test_root(signer: issuer.Signer) -> None:
    root = signer.cert
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"meshd root {TD}"
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert root.not_valid_after_utc - NOW == timedelta(days=3650)
    root.verify_directly_issued_by(root)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", keys.fingerprint(root))


def test_leaf_ignores_what_the_csr_asks_for(signer: issuer.Signer) -> None:
    key = keys.new_private_key()
    csr = make_csr(key, cn="admin", sans=[
        x509.DNSName("ca.example"),
        x509.UniformResourceIdentifier("spiffe://mesh.test/svc/admin"),
    ])
    leaf = issuer.issue_leaf_from_csr(signer, csr, service="web", trust_domain=TD, now=NOW)

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://mesh.test/svc/web")]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web"
    assert keys.same_public_key(key.public_key(), leaf.public_key())
    assert leaf.not_valid_after_utc - NOW == timedelta(hours=24)
    assert NOW - leaf.not_valid_before_utc == timedelta(minutes=1)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    leaf.verify_directly_issued_by(signer.cert)


def test_leaf_chain_verifies_against_the_root(signer: issuer.Signer) -> None:
    leaf = issuer.issue_leaf(signer, keys.new_private_key().public_key(), service="cart",
                             trust_domain=TD, now=NOW)
    verifier = (
        PolicyBuilder().store(Store([signer.cert])).time(NOW + timedelta(hours=1))
        .build_client_verifier()
    )
    verified = verifier.verify(leaf, [])
    assert verified.subjects == [x509.UniformResourceIdentifier("spiffe://mesh.test/svc/cart")]
    assert verified.chain[-1] == signer.cert
    # and no longer once it has expired
    expired = (
        PolicyBuilder().store(Store([signer.cert])).time(NOW + timedelta(hours=25))
        .build_client_verifier()
    )
    with pytest.raises(VerificationError, match="not valid at validation time"):
        expired.verify(leaf, [])


def test_lifetime_serial_and_root_expiry(signer: issuer.Signer) -> None:
    public_key = keys.new_private_key().public_key()
    one = issuer.issue_leaf(signer, public_key, service="web", trust_domain=TD, now=NOW,
                            lifetime=timedelta(hours=1))
    two = issuer.issue_leaf(signer, public_key, service="web", trust_domain=TD, now=NOW)
    assert one.not_valid_after_utc - NOW == timedelta(hours=1)
    assert one.serial_number != two.serial_number
    # a leaf never outlives its root
    late = signer.cert.not_valid_after_utc - timedelta(hours=2)
    clamped = issuer.issue_leaf(signer, public_key, service="web", trust_domain=TD, now=late)
    assert clamped.not_valid_after_utc == signer.cert.not_valid_after_utc
    with pytest.raises(ValueError, match="expired"):
        issuer.issue_leaf(signer, public_key, service="web", trust_domain=TD,
                          now=signer.cert.not_valid_after_utc)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (ec.generate_private_key(ec.SECP384R1()), "secp384r1"),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA"),
        (ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
    ],
)
def test_csr_with_a_key_other_than_p256_is_refused(
    signer: issuer.Signer,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    message: str,
) -> None:
    with pytest.raises(issuer.CSRRejected, match=message):
        issuer.issue_leaf_from_csr(signer, make_csr(key), service="web", trust_domain=TD, now=NOW)


def test_csr_with_a_bad_signature_is_refused(signer: issuer.Signer) -> None:
    der = bytearray(make_csr(keys.new_private_key()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s
    csr = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(issuer.CSRRejected, match="signature"):
        issuer.check_csr(csr)


def test_garbage_csr_is_refused() -> None:
    with pytest.raises(issuer.CSRRejected):
        issuer.load_csr_pem(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE "
                            b"REQUEST-----\n")


def _identity(signer: issuer.Signer, service: str) -> Identity:
    key = keys.new_private_key()
    now = datetime.now(UTC)
    cert = issuer.issue_leaf(signer, key.public_key(), service=service, trust_domain=TD, now=now)
    return Identity.from_pem(keys.cert_pem(cert), keys.private_key_pem(key))


async def test_leaves_do_mutual_tls_with_openssl(tmp_path: Path) -> None:
    key = keys.new_private_key()
    now = datetime.now(UTC)
    signer = issuer.Signer(key, issuer.build_root(key, TD, now))
    root_pem = keys.cert_pem(signer.cert).decode()
    for service in ("web", "payments"):
        write_identity(tmp_path, _identity(signer, service))

    def context(side: ssl.Purpose, service: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(side, cadata=root_pem)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # meshd checks SPIFFE IDs, not host names
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(tmp_path / f"{service}.crt", tmp_path / f"{service}.key")
        return ctx

    left, right = trio.testing.memory_stream_pair()
    client = trio.SSLStream(left, context(ssl.Purpose.SERVER_AUTH, "web"))
    server = trio.SSLStream(right, context(ssl.Purpose.CLIENT_AUTH, "payments"), server_side=True)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
    client_sees = client.getpeercert(binary_form=True)
    server_sees = server.getpeercert(binary_form=True)
    assert client_sees is not None and server_sees is not None
    assert spiffe_ids_from_cert_der(client_sees) == ["spiffe://mesh.test/svc/payments"]
    assert spiffe_ids_from_cert_der(server_sees) == ["spiffe://mesh.test/svc/web"]
