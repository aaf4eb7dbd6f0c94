"""The certificate ``meshd up`` makes for a gateway's https listener declared with
``certificates = "generate"`` in mesh.toml: a CA of the run (its certificate is what a client
trusts: ``curl --cacert <run dir>/gateway/ca.crt https://localhost:8001/``) and a server
certificate for ``localhost``, ``127.0.0.1`` and ``::1``, both in ``<run dir>/gateway/``."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshd.config.gateway import GENERATED, Gateway, GatewayCertificate, GatewayListener
from meshd.config.mesh_schema import MeshHost

LIFETIME = timedelta(days=30)


def needs_certificate(host: MeshHost) -> bool:
    return any(_generated(c) for g in host.gateways for x in g.listeners
               for c in x.certificates)


def make_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """Write ``ca.crt``, ``gateway.crt`` and ``gateway.key`` (0600) to ``directory``; return
    their paths (CA, certificate, key). Made once per run directory."""
    ca_file, cert_file, key_file = (directory / "ca.crt", directory / "gateway.crt",
                                    directory / "gateway.key")
    if ca_file.exists() and cert_file.exists() and key_file.exists():
        return ca_file, cert_file, key_file
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshd up gateway CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + LIFETIME)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=True, content_commitment=False, key_encipherment=False,
              data_encipherment=False, key_agreement=False, key_cert_sign=True,
              crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + LIFETIME)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return ca_file, cert_file, key_file


def with_certificate(host: MeshHost, cert_file: Path, key_file: Path) -> MeshHost:
    """``host`` with its generated gateway certificates pointing at the files made."""

    def certificate(c: GatewayCertificate) -> GatewayCertificate:
        if not _generated(c):
            return c
        return GatewayCertificate(cert_file, key_file, ("localhost",))

    def listener(x: GatewayListener) -> GatewayListener:
        return dataclasses.replace(x, certificates=tuple(map(certificate, x.certificates)))

    def gateway(g: Gateway) -> Gateway:
        return dataclasses.replace(g, listeners=tuple(map(listener, g.listeners)))

    return dataclasses.replace(host, gateways=tuple(map(gateway, host.gateways)))


def _generated(c: GatewayCertificate) -> bool:
    return c.cert.parent.name == GENERATED.name
