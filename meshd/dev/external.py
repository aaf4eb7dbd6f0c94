"""``meshd up``'s stand-ins for services outside the mesh (``[[external]]`` in mesh.toml).

For one with a ``tls_name`` the demo makes its own small PKI: a CA (not the mesh's: the
server is outside the mesh) and a server certificate for that name, in
``<run dir>/external/<name>/``. The route table's external destination of the same name gets
that CA as its ``ca_file`` when it declares none, so the meshds verify the stand-in exactly as
they would verify a real API against its CA.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshd.config.mesh_schema import MeshExternal
from meshd.config.schema import RouteTable
from meshd.fileio import write_atomic
from meshd.identity.keys import cert_pem, new_private_key, private_key_pem

LIFETIME = timedelta(days=7)


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path, name: str, now: datetime | None = None) -> TLSFiles:
    """A CA and a certificate for the DNS name ``name`` it signs, written to ``directory``
    (the key 0600). Blocking (key generation, files): run it in a thread."""
    now = now or datetime.now(UTC)
    ca_key, key = new_private_key(), new_private_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshd up demo CA for {name}")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + LIFETIME)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = TLSFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    write_atomic(files.ca, cert_pem(ca), 0o644)
    write_atomic(files.cert, cert_pem(leaf), 0o644)
    write_atomic(files.key, private_key_pem(key), 0o600)
    return files


def with_ca_files(table: RouteTable, ca_files: dict[str, Path]) -> RouteTable:
    """``table`` with each external destination named in ``ca_files`` that declares no
    ``ca_file`` of its own verifying against the one given."""
    changed = []
    for dest in table.destinations:
        ext = dest.external
        if ext is not None and ext.ca_file is None and dest.service in ca_files:
            ext = dataclasses.replace(ext, ca_file=str(ca_files[dest.service].resolve()))
            dest = dataclasses.replace(dest, external=ext)
        changed.append(dest)
    return dataclasses.replace(table, destinations=tuple(changed))


def expand_external_command(ext: MeshExternal, *, python: str, here: Path,
                            files: TLSFiles | None) -> list[str]:
    """The argv of a stand-in, with its placeholders filled in."""
    values = {"python": python, "here": str(here), "address": ext.address,
              "port": str(ext.port), "name": ext.name,
              "cert": str(files.cert) if files else "", "key": str(files.key) if files else "",
              "ca": str(files.ca) if files else ""}
    return [arg.format(**values) for arg in ext.command]
