"""mTLS for the data plane: SSL contexts from an identity directory, and SPIFFE checks.

An identity directory (written by ``meshd.identity.files``) holds, per local service ``NAME``,
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

With ``admin=True`` it also builds the admin API's TLS: the node certificate (``_node.crt``)
as server certificate, a client certificate required, and ``check_operator`` to accept only
operator identities (``spiffe://<trust domain>/operator/NAME``) that are not revoked.

An expired (or not yet valid) certificate is never presented: its service gets no context at
load time, and every handshake checks the expiry of the one in force (a float comparison), so a
service whose renewal kept failing is refused, with the reason, rather than served with a
certificate peers would reject anyway. The deny list (serials the CA revoked) is checked against
every peer certificate after the handshake, and open connections (both directions, tracked by
their peer's serial) are cut when their peer's serial joins it.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from meshd.errors import IdentityError
from meshd.identity.spiffe import (
    SCHEME,
    Kind,
    NotAnOperator,
    operator_of,
    parse_identity,
    parse_spiffe_id,
    spiffe_id_for,
    spiffe_ids_from_cert,
)

log = logging.getLogger(__name__)

BUNDLE_FILE = "ca.crt"
ALPN_H2 = "h2"  # the ALPN name of HTTP/2 over TLS


class HandshakeRefused(IdentityError):
    """A TLS handshake failed or the peer's identity was wrong. ``reason`` is the short label
    counted in ``meshd_connection_errors{reason}``; the message says why in words."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UncheckedCertificate(IdentityError):
    """A worker's certificate file is not one its supervisor has checked (written since the
    supervisor's last check): it is used once the supervisor's next ``SetTLS`` covers it."""


class MeshSSLObject(ssl.SSLObject):
    """An SSLObject that remembers what the SNI callback saw, for the listener to read back."""

    sni: str | None = None
    sni_refusal: str | None = None


@dataclass(frozen=True)
class CertFacts:
    """What meshd reads from one of its own certificates: its SPIFFE IDs and its validity."""

    spiffe_ids: tuple[str, ...]
    not_before: float  # seconds since the epoch
    not_after: float


def read_certificate(pem: bytes) -> CertFacts:
    """The facts of the first certificate in ``pem``. Raises ``ValueError`` for anything else.

    cryptography is imported here, not with the module: a worker process is told these facts
    by its supervisor (``TLSState(known=...)``) and never loads it (about 9 MB)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    return CertFacts(tuple(spiffe_ids_from_cert(cert)), cert.not_valid_before_utc.timestamp(),
                     cert.not_valid_after_utc.timestamp())


def certificate_digest(pem: bytes) -> str:
    """The key ``TLSState.checked`` and ``known`` use for a certificate file's contents."""
    return hashlib.sha256(pem).hexdigest()


def cert_path(directory: Path, service: str) -> Path:
    return directory / f"{service}.crt"


def key_path(directory: Path, service: str) -> Path:
    return directory / f"{service}.key"


@dataclass(frozen=True)
class _Contexts:
    server: ssl.SSLContext
    by_service: dict[str, ssl.SSLContext]  # server side, selected by SNI
    clients: dict[str, ssl.SSLContext]
    clients_h2: dict[str, ssl.SSLContext]  # the same, offering only ``h2`` by ALPN
    not_after: dict[str, float]            # per loaded service: its certificate's expiry
    unusable: dict[str, str]               # services left out, and why
    admin: ssl.SSLContext | None = None    # the admin API's, with the node certificate
    admin_not_after: float = 0.0
    # the service certificates read for these contexts, by ``certificate_digest``
    checked: dict[str, CertFacts] = field(default_factory=dict)


@dataclass(frozen=True)
class Peer:
    """A verified peer certificate: its one SPIFFE ID's service and its serial (hex)."""

    service: str
    serial: str


class TrackedConnection(Protocol):
    """An open mTLS connection as ``TLSState`` tracks it: cut if its peer's certificate is
    revoked. The proxy's ``TLSStream`` is one; this module never imports the proxy."""

    @property
    def peer_serial(self) -> str: ...

    def abort(self) -> None: ...


class TLSState:
    """The SSL contexts in force for one host's local services. ``clock`` is wall time in
    seconds (injected by tests).

    Each certificate file is checked before it is used (its SPIFFE ID, its validity): parsed
    here, or, given ``known`` (a worker process), looked up there by the digest of its
    contents: the facts its supervisor read from the very same bytes (``checked``). A file
    that is not there (written since the supervisor's check) is ``UncheckedCertificate``: at
    a reload the contexts in force stay; at the start its service is refused until a reload
    finds it checked."""

    def __init__(self, directory: str | Path, trust_domain: str, services: Iterable[str], *,
                 clock: Callable[[], float] = time.time, admin: bool = False,
                 known: Mapping[str, CertFacts] | None = None) -> None:
        self.directory = Path(directory)
        self.trust_domain = trust_domain
        self.services = tuple(services)
        self.admin = admin
        self.known = known
        self._admin_front: ssl.SSLContext | None = None
        self._clock = clock
        self._denied: frozenset[str] = frozenset()
        # open mTLS connections (both directions) by peer serial; weak: closed ones drop out
        self._open: dict[str, weakref.WeakSet[TrackedConnection]] = {}
        self._sweep_at = 1024
        # at the start there are no contexts to keep: a certificate the supervisor has not
        # checked yet leaves its service unusable until the next reload
        self._contexts = self._build(first=True)
        self.generation = 1
        # called after every change (reload, deny list): the worker processes follow
        self.watchers: list[Callable[[], None]] = []

    def reload(self) -> None:
        """Re-read the identity directory. On any problem the contexts in force stay and
        ``IdentityError`` says what is wrong (a renewal caught half-written is retried by the
        caller: the key is written before the certificate, so the pair may briefly mismatch)."""
        self._contexts = self._build()
        self.generation += 1
        log.info("TLS identities reloaded from %s (generation %d)", self.directory,
                 self.generation)
        self._tell_watchers()

    @property
    def checked(self) -> Mapping[str, CertFacts]:
        """The facts of the service certificates in force, by ``certificate_digest``."""
        return self._contexts.checked

    def _tell_watchers(self) -> None:
        for watcher in list(self.watchers):
            watcher()

    @property
    def server_context(self) -> ssl.SSLContext:
        return self._contexts.server

    def client_context(self, service: str, *, h2: bool = False) -> ssl.SSLContext:
        """``service``'s client context; ``h2``: the one offering HTTP/2 by ALPN (the other
        offers nothing: HTTP/1.1 and opaque TCP)."""
        reason = self.unusable_reason(service)
        if reason is not None:
            raise IdentityError(reason)
        try:
            return (self._contexts.clients_h2 if h2 else self._contexts.clients)[service]
        except KeyError:
            raise IdentityError(f"no identity loaded for local service {service!r}") from None

    @property
    def admin_context(self) -> ssl.SSLContext:
        """The admin listener's context: fixed (a listener keeps one), it hands each connection
        to the context in force, so a renewed node certificate serves new connections."""
        if not self.admin:
            raise IdentityError("this TLSState was built without the admin API's TLS")
        if self._admin_front is None:
            self._admin_front = _front_context(ssl.CERT_REQUIRED)
            self._admin_front.sni_callback = self._select_admin
        return self._admin_front

    def _select_admin(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                      _ctx: ssl.SSLContext) -> int | None:
        contexts = self._contexts
        if contexts.admin is None or self._clock() >= contexts.admin_not_after:
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR  # never present an expired certificate
        sslobj.context = contexts.admin
        return None

    def check_operator(self, der: bytes | None) -> str:
        """The operator name of a verified admin client certificate (DER): one SPIFFE ID,
        ``spiffe://<our trust domain>/operator/NAME``, not revoked. Raises ``HandshakeRefused``."""
        ids, serial = _peer_der(der)
        try:
            name = operator_of(ids, self.trust_domain)
        except NotAnOperator as exc:
            raise HandshakeRefused(exc.code, f"client {exc}") from None
        if serial in self._denied:
            raise HandshakeRefused("revoked", f"client {ids[0]} presented certificate {serial}, "
                                   "which the CA revoked")
        return name

    def unusable_reason(self, service: str) -> str | None:
        """Why ``service``'s certificate cannot be presented now (None: it can)."""
        contexts = self._contexts
        if service in contexts.unusable:
            return contexts.unusable[service]
        not_after = contexts.not_after.get(service)
        if not_after is not None and self._clock() >= not_after:
            return (f"the certificate of {service} expired at {_when(not_after)}; not "
                    "presenting it (renewal has been failing: is the CA reachable?)")
        return None

    # -- the deny list -------------------------------------------------------------------------

    def set_denylist(self, serials: Iterable[str]) -> frozenset[str]:
        """Put a new deny list in force: new handshakes with a revoked peer are refused, open
        connections with one are cut. Returns the serials it adds."""
        denied = frozenset(s.lower() for s in serials)
        added = denied - self._denied
        self._denied = denied
        if added:
            cut = 0
            for serial in added:
                for stream in list(self._open.pop(serial, ())):
                    stream.abort()
                    cut += 1
            if cut:
                log.warning("closed %d open connection(s) with a peer whose certificate was "
                            "revoked (%s)", cut, ", ".join(sorted(added)))
        self._tell_watchers()
        return added

    def track(self, stream: TrackedConnection) -> None:
        """Remember an open connection under its peer's serial (cut if that is revoked)."""
        streams = self._open.get(stream.peer_serial)
        if streams is None:
            streams = self._open[stream.peer_serial] = weakref.WeakSet()
            if len(self._open) > self._sweep_at:  # renewals leave empty sets behind
                for serial in [k for k, v in self._open.items() if not v]:
                    del self._open[serial]
                self._sweep_at = max(1024, 2 * len(self._open))
        streams.add(stream)

    def open_connections(self, serial: str) -> int:
        return len(self._open.get(serial, ()))

    @property
    def denied(self) -> frozenset[str]:
        return self._denied

    # -- peer checks -------------------------------------------------------------------------

    def check_server(self, cert: DecodedCertificate | None, destination: str) -> str:
        """Raise ``HandshakeRefused`` unless the upstream (its verified certificate, as
        ``getpeercert()`` gives it) is exactly ``destination`` and not revoked; returns its
        certificate's serial."""
        expected = spiffe_id_for(self.trust_domain, destination)
        ids, serial = _peer(cert)
        if ids != [expected]:
            raise HandshakeRefused(
                "wrong_identity",
                f"upstream presented {', '.join(ids) or 'no SPIFFE ID'}, expected {expected}")
        if serial in self._denied:
            raise HandshakeRefused("revoked", f"upstream {expected} presented certificate "
                                   f"{serial}, which the CA revoked")
        return serial

    def check_client(self, cert: DecodedCertificate | None) -> Peer:
        """The calling service of a verified client certificate (as ``getpeercert()`` gives
        it): its one SPIFFE ID must be a service of our trust domain, its serial not revoked.
        Raises ``HandshakeRefused``."""
        ids, serial = _peer(cert)
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
        if serial in self._denied:
            raise HandshakeRefused("revoked", f"client {ids[0]} presented certificate {serial}, "
                                   "which the CA revoked")
        return Peer(service, serial)

    # -- building ------------------------------------------------------------------------------

    def _build(self, first: bool = False) -> _Contexts:
        bundle = self.directory / BUNDLE_FILE
        by_service: dict[str, ssl.SSLContext] = {}
        clients: dict[str, ssl.SSLContext] = {}
        clients_h2: dict[str, ssl.SSLContext] = {}
        not_after: dict[str, float] = {}
        unusable: dict[str, str] = {}
        checked: dict[str, CertFacts] = {}
        now = self._clock()
        try:
            for service in self.services:
                try:
                    cert = self._check_certificate(service, checked)
                except UncheckedCertificate as exc:
                    if not first:
                        raise
                    log.warning("%s; not presenting it yet", exc)
                    unusable[service] = f"{exc}; not presenting it yet"
                    continue
                reason = _unusable(cert, service, now)
                if reason is not None:
                    log.error("%s", reason)
                    unusable[service] = reason
                    continue
                by_service[service] = _context(ssl.PROTOCOL_TLS_SERVER, bundle,
                                               self.directory, service)
                clients[service] = _context(ssl.PROTOCOL_TLS_CLIENT, bundle,
                                            self.directory, service)
                clients_h2[service] = _context(ssl.PROTOCOL_TLS_CLIENT, bundle,
                                               self.directory, service)
                clients_h2[service].set_alpn_protocols([ALPN_H2])
                # the bytes loaded are the bytes checked (a renewal writes a new file and
                # renames it over the old: a reload caught in between is tried again)
                path = cert_path(self.directory, service)
                if certificate_digest(path.read_bytes()) not in checked:
                    raise IdentityError(f"{path} changed while it was loaded")
                not_after[service] = cert.not_after
            server = _context(ssl.PROTOCOL_TLS_SERVER, bundle, self.directory, None)
            admin, admin_not_after = self._admin_build(bundle, now) if self.admin else (None, 0.0)
        except (OSError, ssl.SSLError) as exc:
            raise IdentityError(f"cannot load TLS identities from {self.directory}: {exc}") \
                from exc
        server.sslobject_class = MeshSSLObject
        server.sni_callback = self._select_by_sni
        return _Contexts(server, by_service, clients, clients_h2, not_after, unusable, admin,
                         admin_not_after, checked)

    def _admin_build(self, bundle: Path, now: float) -> tuple[ssl.SSLContext | None, float]:
        # the admin API is the supervisor's: a worker never loads the identity files' module
        # (it brings cryptography)
        from meshd.identity.files import node_files

        cert_file, key_file = node_files(self.directory)
        cert = self._read(cert_file, {})
        ids = list(cert.spiffe_ids)
        try:
            td, kind, _ = parse_identity(ids[0]) if len(ids) == 1 else ("", Kind.SERVICE, "")
        except ValueError:
            td, kind = "", Kind.SERVICE
        if (td, kind) != (self.trust_domain, Kind.NODE):
            raise IdentityError(f"{cert_file} is the certificate of {ids or 'nobody'}, not of a "
                                f"node of {self.trust_domain}")
        reason = _unusable(cert, "the node (admin API)", now)
        if reason is not None:
            log.error("%s", reason)
            return None, 0.0
        ctx = _front_context(ssl.CERT_REQUIRED)
        ctx.load_verify_locations(cafile=str(bundle))
        ctx.load_cert_chain(str(cert_file), str(key_file))
        return ctx, cert.not_after

    def _read(self, path: Path, checked: dict[str, CertFacts]) -> CertFacts:
        """The facts of the certificate in ``path`` (added to ``checked``); ``OSError`` if it
        cannot be read, ``IdentityError`` if it is not a certificate."""
        pem = path.read_bytes()
        digest = certificate_digest(pem)
        if self.known is not None:
            facts = self.known.get(digest)
            if facts is None:
                raise UncheckedCertificate(f"{path} is not a certificate the supervisor has "
                                           "checked (written since its last check)")
        else:
            try:
                facts = read_certificate(pem)
            except ValueError as exc:
                raise IdentityError(f"{path} is not a PEM certificate: {exc}") from exc
        checked[digest] = facts
        return facts

    def _check_certificate(self, service: str, checked: dict[str, CertFacts]) -> CertFacts:
        path = cert_path(self.directory, service)
        cert = self._read(path, checked)
        expected = spiffe_id_for(self.trust_domain, service)
        ids = list(cert.spiffe_ids)
        if ids != [expected]:
            raise IdentityError(f"{path} is the certificate of {ids or 'nobody'}, "
                                f"not of {expected}")
        return cert

    def _select_by_sni(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                       _ctx: ssl.SSLContext) -> int | None:
        """Runs inside OpenSSL's ClientHello processing: must not raise."""
        context = self._contexts.by_service.get(server_name or "")
        reason = self.unusable_reason(server_name) if server_name else None
        if reason is not None:
            context = None
        if isinstance(sslobj, MeshSSLObject):
            sslobj.sni = server_name
            if context is None:
                sslobj.sni_refusal = reason or (
                    f"client asked for unknown service {server_name!r}" if server_name
                    else "client sent no SNI")
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
        # HTTP/2 for callers that offer it (ALPN); the others speak HTTP/1.1 or opaque TCP
        ctx.set_alpn_protocols([ALPN_H2, "http/1.1"])
        # No session tickets: meshd does not resume sessions, and a server that sends nothing
        # after the handshake keeps idle pooled connections quiet.
        ctx.num_tickets = 0
    if service is not None:
        ctx.load_cert_chain(str(cert_path(directory, service)), str(key_path(directory, service)))
    return ctx


def _front_context(verify: ssl.VerifyMode) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = verify
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


# a verified peer certificate as ``SSLObject.getpeercert()`` decodes it (OpenSSL's parser)
DecodedCertificate = Mapping[str, Any]


def _peer(cert: DecodedCertificate | None) -> tuple[list[str], str]:
    """The SPIFFE IDs (URI SANs, in certificate order) and the serial (lowercase hex, as the
    deny list has it) of a verified peer certificate. Nothing when there is no certificate or
    its serial cannot be read: then no identity is accepted."""
    if not cert:
        return [], ""
    try:
        serial = format(int(str(cert["serialNumber"]), 16), "x")
        names = tuple(cert.get("subjectAltName", ()))
    except (KeyError, TypeError, ValueError):
        return [], ""
    return [value for kind, value in names
            if kind == "URI" and isinstance(value, str) and value.startswith(SCHEME)], serial


def _peer_der(der: bytes | None) -> tuple[list[str], str]:
    """The SPIFFE IDs and the serial (hex) of a DER certificate (nothing for junk): the admin
    API's clients (its HTTP server hands over the DER form; cryptography is loaded there)."""
    if not der:
        return [], ""
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return [], ""
    return spiffe_ids_from_cert(cert), format(cert.serial_number, "x")


def _unusable(cert: CertFacts, service: str, now: float) -> str | None:
    if now < cert.not_before:
        return (f"the certificate of {service} is not valid before "
                f"{_when(cert.not_before)}; not presenting it")
    if now >= cert.not_after:
        return (f"the certificate of {service} expired at "
                f"{_when(cert.not_after)}; not presenting it")
    return None


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": ("expired", "peer says our certificate has expired"),
}


# X509_V_ERR_* codes with a label of their own (everything else is "untrusted_chain")
_VERIFY_CODES = {9: "not_yet_valid", 10: "expired"}


def classify_tls_failure(exc: BaseException) -> tuple[str, str]:
    """A metric label and an explanation for a failed handshake (or a first read that failed
    because the peer refused us), from the ``ssl.SSLError`` somewhere in ``exc``'s causes."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            label = _VERIFY_CODES.get(seen.verify_code, "untrusted_chain")
            return label, f"peer certificate refused: {seen.verify_message}"
        if isinstance(seen, ssl.SSLError):
            reason = getattr(seen, "reason", None) or ""
            label, text = _REASONS.get(reason, ("handshake_failed", "TLS handshake failed"))
            return label, f"{text} ({reason or seen})"
        seen = seen.__cause__ or seen.__context__
    return "handshake_failed", f"TLS handshake failed ({exc})"
