"""mTLS for the data plane: SSL contexts from an identity directory, and SPIFFE checks.

An identity directory (written by ``meshd.ca.files``) holds, per local service ``NAME``,
``NAME.crt`` (leaf, optionally followed by intermediates) and ``NAME.key`` (0600), and the
trust bundle ``ca.crt``. From it ``TLSState`` builds

* one server context for the inbound listener; its SNI callback swaps in the context of the
  local service the client named, so each service answers with its own certificate;
* one client context per local service, presenting that service's certificate.

All of them require a peer certificate chaining to the bundle, TLS 1.3 only. Hostname checks
are off (URI SANs are not hostnames): after every handshake the peer's SPIFFE ID is checked here
instead, exactly, against ``spiffe://<trust domain>/svc/<service>``.

``reload()`` re-reads the files and swaps the contexts: new connections use the new
certificates, connections already open keep the SSL objects they were made with.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from meshd.ca.spiffe import (
    parse_spiffe_id,
    spiffe_id_for,
    spiffe_ids_from_cert,
    spiffe_ids_from_cert_der,
)
from meshd.errors import IdentityError

log = logging.getLogger(__name__)

BUNDLE_FILE = "ca.crt"


class HandshakeRefused(IdentityError):
    """A TLS handshake failed or the peer's identity was wrong. ``reason`` is the short label
    counted in ``meshd_connection_errors{reason}``; the message says why in words."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class MeshSSLObject(ssl.SSLObject):
    """An SSLObject that remembers what the SNI callback saw, for the listener to read back."""

    sni: str | None = None
    sni_refusal: str | None = None


def cert_path(directory: Path, service: str) -> Path:
    return directory / f"{service}.crt"


def key_path(directory: Path, service: str) -> Path:
    return directory / f"{service}.key"


@dataclass(frozen=True)
class _Contexts:
    server: ssl.SSLContext
    by_service: dict[str, ssl.SSLContext]  # server side, selected by SNI
    clients: dict[str, ssl.SSLContext]


class TLSState:
    """The SSL contexts in force for one host's local services."""

    def __init__(self, directory: str | Path, trust_domain: str, services: Iterable[str]) -> None:
        self.directory = Path(directory)
        self.trust_domain = trust_domain
        self.services = tuple(services)
        self._contexts = self._build()
        self.generation = 1

    def reload(self) -> None:
        """Re-read the identity directory. On any problem the contexts in force stay and
        ``IdentityError`` says what is wrong (a renewal caught half-written is retried by the
        caller: the key is written before the certificate, so the pair may briefly mismatch)."""
        self._contexts = self._build()
        self.generation += 1
        log.info("TLS identities reloaded from %s (generation %d)", self.directory,
                 self.generation)

    @property
    def server_context(self) -> ssl.SSLContext:
        return self._contexts.server

    def client_context(self, service: str) -> ssl.SSLContext:
        try:
            return self._contexts.clients[service]
        except KeyError:
            raise IdentityError(f"no identity loaded for local service {service!r}") from None

    # -- peer checks -------------------------------------------------------------------------

    def check_server(self, der: bytes | None, destination: str) -> None:
        """Raise ``HandshakeRefused`` unless the upstream is exactly ``destination``."""
        expected = spiffe_id_for(self.trust_domain, destination)
        ids = _peer_ids(der)
        if ids != [expected]:
            raise HandshakeRefused(
                "wrong_identity",
                f"upstream presented {', '.join(ids) or 'no SPIFFE ID'}, expected {expected}")

    def source_of(self, der: bytes | None) -> str:
        """The calling service of a verified client certificate: its one SPIFFE ID must be a
        service of our trust domain. Raises ``HandshakeRefused``."""
        ids = _peer_ids(der)
        if len(ids) != 1:
            raise HandshakeRefused(
                "wrong_identity",
                f"client certificate carries {len(ids)} SPIFFE IDs, expected exactly one")
        try:
            trust_domain, service = parse_spiffe_id(ids[0])
        except ValueError as exc:
            raise HandshakeRefused("wrong_identity", f"client identity refused: {exc}") from None
        if trust_domain != self.trust_domain:
            raise HandshakeRefused(
                "foreign_trust_domain",
                f"client {ids[0]} is not of trust domain {self.trust_domain}")
        return service

    # -- building ------------------------------------------------------------------------------

    def _build(self) -> _Contexts:
        bundle = self.directory / BUNDLE_FILE
        by_service: dict[str, ssl.SSLContext] = {}
        clients: dict[str, ssl.SSLContext] = {}
        try:
            for service in self.services:
                self._check_certificate(service)
                by_service[service] = _context(ssl.PROTOCOL_TLS_SERVER, bundle,
                                               self.directory, service)
                clients[service] = _context(ssl.PROTOCOL_TLS_CLIENT, bundle,
                                            self.directory, service)
            server = _context(ssl.PROTOCOL_TLS_SERVER, bundle, self.directory, None)
        except (OSError, ssl.SSLError) as exc:
            raise IdentityError(f"cannot load TLS identities from {self.directory}: {exc}") \
                from exc
        server.sslobject_class = MeshSSLObject
        server.sni_callback = self._select_by_sni
        return _Contexts(server, by_service, clients)

    def _check_certificate(self, service: str) -> None:
        path = cert_path(self.directory, service)
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError as exc:
            raise IdentityError(f"{path} is not a PEM certificate: {exc}") from exc
        expected = spiffe_id_for(self.trust_domain, service)
        ids = spiffe_ids_from_cert(cert)
        if ids != [expected]:
            raise IdentityError(f"{path} is the certificate of {ids or 'nobody'}, "
                                f"not of {expected}")

    def _select_by_sni(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                       _ctx: ssl.SSLContext) -> int | None:
        """Runs inside OpenSSL's ClientHello processing: must not raise."""
        context = self._contexts.by_service.get(server_name or "")
        if isinstance(sslobj, MeshSSLObject):
            sslobj.sni = server_name
            if context is None:
                sslobj.sni_refusal = (f"client asked for unknown service {server_name!r}"
                                      if server_name else "client sent no SNI")
        if context is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = context
        return None


def _context(protocol: ssl._SSLMethod, bundle: Path, directory: Path,
             service: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(bundle))
    if protocol == ssl.PROTOCOL_TLS_SERVER:
        # No session tickets: meshd does not resume sessions, and a server that sends nothing
        # after the handshake keeps idle pooled connections quiet.
        ctx.num_tickets = 0
    if service is not None:
        ctx.load_cert_chain(str(cert_path(directory, service)), str(key_path(directory, service)))
    return ctx


def _peer_ids(der: bytes | None) -> list[str]:
    if not der:
        return []
    try:
        return spiffe_ids_from_cert_der(der)
    except ValueError:
        return []


# OpenSSL reason codes -> (metric label, what to tell the operator)
_REASONS = {
    "HTTP_REQUEST": ("plaintext", "plaintext HTTP on the mTLS port"),
    "HTTPS_PROXY_REQUEST": ("plaintext", "plaintext proxy request on the mTLS port"),
    "WRONG_VERSION_NUMBER": ("plaintext", "not a TLS client (plaintext on the mTLS port?)"),
    "UNKNOWN_PROTOCOL": ("plaintext", "not a TLS client (plaintext on the mTLS port?)"),
    "PACKET_LENGTH_TOO_LONG": ("plaintext", "not a TLS client (plaintext on the mTLS port?)"),
    "RECORD_LAYER_FAILURE": ("plaintext", "not a TLS client (plaintext on the mTLS port?)"),
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": ("no_client_cert", "client presented no certificate"),
    "CERTIFICATE_VERIFY_FAILED": ("untrusted_chain",
                                  "peer certificate does not chain to the trust bundle"),
    "TLSV1_ALERT_UNKNOWN_CA": ("untrusted_chain", "peer does not trust our certificate"),
    "SSLV3_ALERT_BAD_CERTIFICATE": ("untrusted_chain", "peer refused our certificate"),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": ("untrusted_chain", "peer refused our certificate"),
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": ("no_client_cert",
                                          "peer required a client certificate"),
    "UNSUPPORTED_PROTOCOL": ("tls_version", "peer does not speak TLS 1.3"),
    "TLSV1_ALERT_PROTOCOL_VERSION": ("tls_version", "peer does not speak TLS 1.3"),
    "TLSV1_UNRECOGNIZED_NAME": ("unknown_service", "server does not host the service asked for"),
    "TLSV1_ALERT_UNRECOGNIZED_NAME": ("unknown_service",
                                      "server does not host the service asked for"),
}


def classify_tls_failure(exc: BaseException) -> tuple[str, str]:
    """A metric label and an explanation for a failed handshake (or a first read that failed
    because the peer refused us), from the ``ssl.SSLError`` somewhere in ``exc``'s causes."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            reason = getattr(seen, "reason", None) or ""
            label, text = _REASONS.get(reason, ("handshake_failed", "TLS handshake failed"))
            return label, f"{text} ({reason or seen})"
        seen = seen.__cause__ or seen.__context__
    return "handshake_failed", f"TLS handshake failed ({exc})"
