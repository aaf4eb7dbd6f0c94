"""The CA's HTTPS API, a thin trio shell over ``issuer`` (signing) and ``store`` (tokens).

    GET  /v1/ca/roots   the trust bundle; no authentication (clients check it against their pin)
    POST /v1/ca/join    a join token, a node name and one CSR per service -> certificates

Refusals are JSON ``{"error": code, "reason": sentence}`` and are logged with the reason and the
token's id (never the token's secret, never a key).

The API's own TLS certificate is issued from the root at start, for the listen address plus
loopback names, and re-issued at half its lifetime; workload certificates carry no DNS/IP SANs, so
a leaked service key cannot pass a client's hostname check for the CA.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from meshd.ca import issuer, tokens
from meshd.ca.files import write_private_file, write_public_file
from meshd.ca.spiffe import check_name, spiffe_id_for
from meshd.ca.store import CAMaterial, TokenStore, load_ca
from meshd.ca.tokens import Refusal
from meshd.errors import CAError
from meshd.httpd import Request, Response, serve_http

log = logging.getLogger(__name__)

MAX_JOIN_BODY = 64 * 1024       # answered with a JSON 413 by the handler
MAX_HTTP_BODY = 256 * 1024      # beyond this the HTTP layer refuses before reading the body
MAX_SERVICES_PER_JOIN = 64
SERVER_CERT_LIFETIME = timedelta(days=7)
WILDCARD_HOSTS = ("", "0.0.0.0", "::")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class JoinRequest:
    token: str
    node: str
    public_keys: Mapping[str, ec.EllipticCurvePublicKey]


@dataclass(frozen=True)
class CAEndpoint:
    """Where a running CA listens (what ``serve_ca`` reports once it accepts connections)."""

    addresses: tuple[tuple[str, int], ...]
    fingerprint: str
    trust_domain: str

    @property
    def url(self) -> str:
        host, port = self.addresses[0]
        return f"https://{'[' + host + ']' if ':' in host else host}:{port}"


def parse_join_request(body: bytes) -> JoinRequest | Refusal:
    """Validate a join body (pure). A missing token is a 401; anything else malformed is a 400."""
    try:
        obj = json.loads(body)
    except ValueError:
        return Refusal(400, "bad_request", "the request body is not valid JSON")
    if not isinstance(obj, dict):
        return Refusal(400, "bad_request", "the request body must be a JSON object")
    token = obj.get("token")
    if not isinstance(token, str) or not token:
        return Refusal(401, "missing_token", "a join token is required")
    node = obj.get("node")
    if not isinstance(node, str):
        return Refusal(400, "bad_request", "'node' must be a string")
    csrs = obj.get("csrs")
    if not isinstance(csrs, dict) or not csrs:
        return Refusal(400, "bad_request", "'csrs' must be an object mapping service to CSR PEM")
    if len(csrs) > MAX_SERVICES_PER_JOIN:
        return Refusal(400, "bad_request", f"at most {MAX_SERVICES_PER_JOIN} services per join")
    try:
        check_name(node, "node")
    except ValueError as exc:
        return Refusal(400, "bad_request", str(exc))
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for service, pem in csrs.items():
        try:
            check_name(service)
        except ValueError as exc:
            return Refusal(400, "bad_request", str(exc))
        if not isinstance(pem, str):
            return Refusal(400, "bad_csr", f"the CSR for {service!r} must be a PEM string")
        try:
            keys[service] = issuer.check_csr(issuer.load_csr_pem(pem.encode()))
        except issuer.CSRRejected as exc:
            return Refusal(400, "bad_csr", f"CSR for service {service!r} refused: {exc}")
    return JoinRequest(token=token, node=node, public_keys=keys)


class CAService:
    """Request handler of the CA API. Blocking work (token store) runs in worker threads."""

    def __init__(self, material: CAMaterial, token_store: TokenStore, clock: Clock = utc_now):
        self._ca = material
        self._tokens = token_store
        self._clock = clock

    async def handle(self, request: Request) -> Response:
        routes = {"/v1/ca/roots": ("GET", self._roots), "/v1/ca/join": ("POST", self._join)}
        route = routes.get(request.path)
        if route is None:
            return _refuse(Refusal(404, "not_found", f"no such endpoint: {request.path}"))
        method, endpoint = route
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            response = _refuse(Refusal(405, "method_not_allowed", f"use {method}"))
            response.headers.append(("Allow", method))
            return response
        return await endpoint(request)

    async def _roots(self, request: Request) -> Response:
        return Response.json({"trust_domain": self._ca.trust_domain, "roots": self._roots_pem()})

    async def _join(self, request: Request) -> Response:
        peer = f"{request.remote[0]}:{request.remote[1]}" if request.remote else "?"
        if len(request.body) > MAX_JOIN_BODY:
            too_large = f"join requests are limited to {MAX_JOIN_BODY} bytes"
            return self._refused(
                Refusal(413, "body_too_large", too_large), peer, node=None, token_id=None
            )
        parsed = parse_join_request(request.body)
        if isinstance(parsed, Refusal):
            return self._refused(parsed, peer, node=None, token_id=None)
        services = sorted(parsed.public_keys)
        try:
            record, refusal = await trio.to_thread.run_sync(
                partial(
                    self._tokens.redeem, parsed.token, node=parsed.node, services=services,
                    now=self._clock(),
                )
            )
        except CAError as exc:
            log.error("join from %s failed: %s", peer, exc)
            return _refuse(Refusal(500, "internal", "the CA cannot read its token store"))
        token_id = record.token_id if record is not None else None
        if refusal is not None:
            return self._refused(refusal, peer, node=parsed.node, token_id=token_id)

        now = self._clock()
        td = self._ca.trust_domain
        certificates: dict[str, Any] = {}
        for service in services:
            try:
                cert = issuer.issue_leaf(
                    self._ca.signer, parsed.public_keys[service], service=service,
                    trust_domain=td, now=now, lifetime=self._ca.settings.leaf_lifetime,
                )
            except ValueError as exc:  # the root has expired
                log.error("cannot issue %s: %s", spiffe_id_for(td, service), exc)
                return _refuse(Refusal(500, "cannot_issue", str(exc)))
            certificates[service] = {
                "cert_pem": issuer.cert_pem(cert).decode(),
                "serial": issuer.serial_hex(cert),
                "not_after": tokens.format_time(cert.not_valid_after_utc),
                "spiffe_id": spiffe_id_for(td, service),
            }
            log.info(
                "issued %s to node %r from %s (token %s): serial %s, valid until %s",
                spiffe_id_for(td, service), parsed.node, peer, token_id,
                certificates[service]["serial"], certificates[service]["not_after"],
            )
        return Response.json(
            {"trust_domain": td, "roots": self._roots_pem(), "certificates": certificates}
        )

    def _roots_pem(self) -> list[str]:
        return [issuer.cert_pem(root).decode() for root in self._ca.roots()]

    @staticmethod
    def _refused(
        refusal: Refusal, peer: str, *, node: str | None, token_id: str | None
    ) -> Response:
        log.warning(
            "join refused for node %r from %s (token %s): %s: %s",
            node, peer, token_id or "-", refusal.code, refusal.reason,
        )
        return _refuse(refusal)


def _refuse(refusal: Refusal) -> Response:
    return Response.json({"error": refusal.code, "reason": refusal.reason}, refusal.status)


def server_hosts(listen_host: str, extra: Iterable[str], local_names: Iterable[str]) -> list[str]:
    """The names the CA's TLS certificate covers: the listen address (or, for a wildcard,
    ``local_names``), loopback, and ``extra`` (pure)."""
    hosts = list(local_names) if listen_host in WILDCARD_HOSTS else [listen_host]
    hosts += ["localhost", "127.0.0.1", "::1", *extra]
    # (non-ASCII names cannot be DNS SANs as they are; IDNA would be the operator's --san)
    return list(dict.fromkeys(h for h in hosts if h and h.isascii()))


def local_names() -> list[str]:
    """This machine's host names and interface addresses (blocking: call in a thread)."""
    names = [socket.gethostname(), socket.getfqdn()]
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6) and "%" not in addr.address:
                names.append(addr.address)
    return names


def server_tls_context(material: CAMaterial, hosts: list[str], now: datetime) -> ssl.SSLContext:
    """A TLS 1.3 server context holding a fresh certificate for ``hosts``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["http/1.1"])
    key = issuer.new_private_key()
    _load_server_cert(context, material, key, hosts, now)
    return context


def _load_server_cert(
    context: ssl.SSLContext,
    material: CAMaterial,
    key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    now: datetime,
) -> None:
    cert = issuer.issue_server_cert(
        material.signer, key.public_key(), hosts=hosts, now=now, lifetime=SERVER_CERT_LIFETIME
    )
    # ssl only loads certificates from files: use a private temporary directory, gone at once.
    with tempfile.TemporaryDirectory(prefix="meshd-ca-tls-") as tmp:
        key_path, cert_path = Path(tmp, "server.key"), Path(tmp, "server.crt")
        write_private_file(key_path, issuer.private_key_pem(key))
        write_public_file(cert_path, issuer.cert_pem(cert))
        context.load_cert_chain(os.fspath(cert_path), os.fspath(key_path))


async def _renew_server_cert(
    context: ssl.SSLContext, material: CAMaterial, hosts: list[str], clock: Clock
) -> None:
    # Loading a new chain into the live context affects new handshakes only; open connections
    # keep the certificate they negotiated.
    while True:
        await trio.sleep(SERVER_CERT_LIFETIME.total_seconds() / 2)
        key = await trio.to_thread.run_sync(issuer.new_private_key)
        _load_server_cert(context, material, key, hosts, clock())
        log.info("renewed the CA API's TLS certificate")


async def serve_ca(
    directory: str | os.PathLike[str],
    host: str,
    port: int,
    *,
    extra_hosts: Iterable[str] = (),
    clock: Clock = utc_now,
    task_status: trio.TaskStatus[CAEndpoint] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the CA in ``directory`` on host:port (0 picks a port) until cancelled.

    ``task_status.started`` receives a ``CAEndpoint`` once connections are accepted. Raises
    CAError if the CA cannot be loaded or the address cannot be bound.
    """
    material = await trio.to_thread.run_sync(load_ca, directory)
    names: list[str] = []
    if host in WILDCARD_HOSTS:
        names = await trio.to_thread.run_sync(local_names)
    hosts = server_hosts(host, extra_hosts, names)
    context = server_tls_context(material, hosts, clock())
    service = CAService(material, TokenStore(directory), clock)

    bind_error: OSError | None = None
    async with trio.open_nursery() as nursery:
        try:
            listeners = await nursery.start(
                partial(
                    serve_http, service.handle, host, port,
                    ssl_context=context, max_body=MAX_HTTP_BODY,
                )
            )
        except OSError as exc:
            # Raised outside the nursery so callers see a CAError, not an exception group.
            bind_error = exc
        else:
            nursery.start_soon(_renew_server_cert, context, material, hosts, clock)
            addresses = tuple(
                (str(sa[0]), int(sa[1])) for sa in (lst.socket.getsockname() for lst in listeners)
            )
            endpoint = CAEndpoint(addresses, material.fingerprint, material.trust_domain)
            log.info(
                "CA for trust domain %s listening on %s (root %s)",
                material.trust_domain, ", ".join(_format_addr(a) for a in addresses),
                material.fingerprint,
            )
            task_status.started(endpoint)
    if bind_error is not None:
        reason = bind_error.strerror or str(bind_error)
        raise CAError(f"cannot listen on {_format_addr((host, port))}: {reason}") from bind_error


def _format_addr(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
