"""Test kit for external services: servers outside the mesh speaking real TLS with
certificates for DNS names, from a test CA of their own (not the mesh's)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from proxy_testing import Backend, MiniCA


def server_files(ca: MiniCA, directory: Path, dns: str) -> tuple[Path, Path]:
    """A server certificate for the DNS name ``dns`` signed by ``ca``, and its key, written
    to ``directory``; returns their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{dns}.crt", directory / f"{dns}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def write_ca(ca: MiniCA, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ca.pem)
    return path


@dataclass
class TLSBackend(Backend):
    """``Backend`` over TLS with the certificate and key given; counts failed handshakes."""

    cert_file: Path | None = None
    key_file: Path | None = None
    handshake_failures: int = 0
    snis: list[str | None] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        assert self.cert_file is not None and self.key_file is not None
        context.load_cert_chain(str(self.cert_file), str(self.key_file))

        def remember(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            self.snis.append(name)

        context.sni_callback = remember  # type: ignore[assignment]
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listener.socket.getsockname()[1])
        task_status.started()

        async def connection(stream: trio.SocketStream) -> None:
            tls = trio.SSLStream(stream, context, server_side=True)
            try:
                with trio.fail_after(5):
                    await tls.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                self.handshake_failures += 1
                await trio.aclose_forcefully(stream)
                return
            await self._connection(tls)  # type: ignore[arg-type]

        await trio.serve_listeners(connection, [listener])
