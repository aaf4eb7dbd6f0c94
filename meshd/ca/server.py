"""The CA's HTTPS API, a thin trio shell over ``issuer`` (signing), ``ledger`` (decisions) and
``store`` (tokens, ledger, audit on disk).

    GET  /v1/ca/roots     the trust bundle; no authentication (clients check it against their pin
                          or against the bundle they already trust)
    POST /v1/ca/join      a join token, a node name, one CSR per service and one for the node ->
                          certificates, including the node certificate
    POST /v1/ca/renew     mutual TLS with the node certificate (never a token): CSRs for the
                          node's services and for the node itself -> certificates
    GET  /v1/ca/denylist  serials of revoked certificates still valid, with a version number,
                          and the fingerprints of the roots in the bundle (what pollers
                          watch; a node certificate presented here confirms its batch, and
                          hears whether the operator asked it to renew now: ``renew``)
    GET  /metrics         Prometheus text, for an operator certificate only (``metrics``)

Every refusal is JSON ``{"error": code, "reason": sentence}``, logged with the reason and appended
to the audit log with who asked (the token's id, never its secret; never a key). The API speaks
TLS 1.3 only; request bodies are bounded. Failed joins are throttled per source address
(``throttle``): past a few, the address is answered 429 with ``Retry-After``, doubling, without
touching the CA's state or its audit log.

The API's own TLS (``server_tls``) is issued from the signing root at start, for the listen
address plus loopback names, served with the rotation's cross certificate when there is one, and
issued again at half its lifetime and whenever another process rotates the root. Workload
certificates carry no DNS/IP SANs, so a leaked service key cannot pass a client's hostname check
for the CA. Client certificates are requested but optional: joins have none. Request bodies are
parsed by ``requests`` (pure).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric import ec

from meshd import timestamps
from meshd.ca import audit, issuer, ledger, store
from meshd.ca.ledger import IssuedRecord, NodeRecord
from meshd.ca.metrics import CAMetrics
from meshd.ca.requests import (
    CertRequest,
    JoinRequest,
    PeerCertificate,
    parse_join_request,
    parse_renew_request,
)
from meshd.ca.server_tls import (
    WILDCARD_HOSTS,
    Clock,
    MaterialCache,
    ServerTLS,
    local_names,
    maintain_tls,
    roots_pem,
    server_hosts,
    server_tls_context,
)
from meshd.ca.store import CADatabase, CAMaterial, load_ca
from meshd.ca.throttle import JoinThrottle
from meshd.ca.tokens import Refusal
from meshd.config.schema import ListenerLimits
from meshd.errors import CAError
from meshd.httpd import Request, Response, serve_http
from meshd.identity import keys
from meshd.identity.spiffe import Kind, spiffe_id_of

__all__ = [  # (the request parsing and the API's TLS live in requests and server_tls)
    "CAEndpoint", "CAService", "CertRequest", "JoinRequest", "PeerCertificate",
    "parse_join_request", "parse_renew_request", "serve_ca", "server_hosts",
    "server_tls_context",
]

log = logging.getLogger(__name__)

MAX_JOIN_BODY = 64 * 1024       # answered with a JSON 413 by the handler
MAX_HTTP_BODY = 256 * 1024      # beyond this the HTTP layer refuses before reading the body
# connection caps: every host holds a connection or two (renewals, deny-list polls)
DEFAULT_LIMITS = ListenerLimits(10_000, 256)


# refusals that count as a failed guess: a bad, used-up or expired token, a node or service the
# token does not allow, and malformed requests (a guesser need not send well-formed ones)
_GUESS_STATUSES = frozenset({400, 401, 403, 413})


def utc_now() -> datetime:
    return datetime.now(UTC)


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


class CAService:
    """Request handler of the CA API. Blocking work (tokens, ledger, signing) runs in worker
    threads, under the CA's lock."""

    def __init__(self, material: CAMaterial | MaterialCache, db: CADatabase | None = None,
                 clock: Clock = utc_now):
        self._materials = (material if isinstance(material, MaterialCache)
                           else MaterialCache(material.directory, material))
        self._db = db or CADatabase(self._materials.current.directory)
        self._clock = clock
        self._throttle = JoinThrottle()
        self.metrics = CAMetrics(self._materials, self._db, clock)

    async def handle(self, request: Request) -> Response:
        routes = {
            "/v1/ca/roots": ("GET", self._roots),
            "/v1/ca/join": ("POST", self._join),
            "/v1/ca/renew": ("POST", self._renew),
            "/v1/ca/denylist": ("GET", self._denylist),
            "/metrics": ("GET", self._metrics),
        }
        route = routes.get(request.path)
        if route is None:
            return _refuse(Refusal(404, "not_found", f"no such endpoint: {request.path}"))
        method, endpoint = route
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            response = _refuse(Refusal(405, "method_not_allowed", f"use {method}"))
            response.headers.append(("Allow", method))
            return response
        return await endpoint(request)

    # -- endpoints -------------------------------------------------------------------------------

    async def _roots(self, request: Request) -> Response:
        material = self._materials.current
        return Response.json({"trust_domain": material.trust_domain,
                              "roots": roots_pem(material),
                              "signing_root": material.fingerprint})

    async def _metrics(self, request: Request) -> Response:
        try:
            body = await trio.to_thread.run_sync(self.metrics.render, request.peer_cert_der)
        except CAError as exc:
            log.error("metrics unavailable: %s", exc)
            return _refuse(Refusal(500, "internal", "the CA cannot read its state"))
        if isinstance(body, Refusal):
            _log_refusal(body, "metrics", f"request from {_peer_address(request)}")
            return _refuse(body)
        return Response(200, body, [("Content-Type", self.metrics.content_type)])

    async def _denylist(self, request: Request) -> Response:
        def read() -> tuple[int, list[str], dict[str, Any] | None]:
            state = self._db.ledger()
            peer = PeerCertificate.from_der(request.peer_cert_der)
            renew = None
            if peer is not None:
                self._confirm(state, peer)
                asked = ledger.renewal_asked(state, peer.serial)
                if asked is not None:  # only ever to the holder of the node certificate
                    renew = {"serial": peer.serial, "before": timestamps.format_time(asked.before),
                             "spread_seconds": asked.spread_seconds}
            return state.denylist_version, ledger.denylist(state, self._clock()), renew

        try:
            version, serials, renew = await trio.to_thread.run_sync(read)
        except CAError as exc:
            log.error("deny list unavailable: %s", exc)
            return _refuse(Refusal(500, "internal", "the CA cannot read its state"))
        # the roots' fingerprints too, so that pollers fetch /v1/ca/roots only on a change
        roots = [keys.fingerprint(r) for r in self._materials.current.roots()]
        body: dict[str, Any] = {"version": version, "serials": serials, "roots": roots}
        if renew is not None:
            body["renew"] = renew
        return Response.json(body)

    def _confirm(self, state: ledger.Ledger, peer: PeerCertificate) -> None:
        """A node polling with its node certificate holds that certificate's batch: record it
        (once per batch) so the batches before it stop counting for a root rotation."""
        issued = state.issued.get(peer.serial)
        if issued is None or issued.kind is not Kind.NODE or issued.node is None:
            return
        node = state.nodes.get(issued.node)
        if node is None or issued.batch <= node.confirmed_batch:
            return
        with self._db.transaction() as txn:
            if ledger.confirm(txn.ledger, issued.node, peer.serial):
                log.info("node %s confirmed batch %d (node certificate %s)", issued.node,
                         issued.batch, peer.serial)

    async def _join(self, request: Request) -> Response:
        who = f"{_peer_address(request)}"
        source = request.remote[0] if request.remote else "?"
        wait = self._throttle.retry_after(source, trio.current_time())
        if wait > 0:  # answered without the CA's lock, state or audit log
            seconds = math.ceil(wait)
            self.metrics.refused.labels("join", "too_many_attempts").inc()
            response = _refuse(Refusal(429, "too_many_attempts",
                                       f"too many failed joins from {source}: try again in "
                                       f"{seconds} s"))
            response.headers.append(("Retry-After", str(seconds)))
            return response
        response = await self._join_unthrottled(request, who)
        if response.status in _GUESS_STATUSES:
            closed_for = self._throttle.failed(source, trio.current_time())
            if closed_for > 0:
                await self._refused(Refusal(429, "too_many_attempts",
                                            f"{source} is closed to joins for {closed_for:g} s "
                                            "after repeated failures"), "join", who,
                                    count=False)  # (the failed join was counted)
        elif response.status == 200:
            self._throttle.succeeded(source)
        return response

    async def _join_unthrottled(self, request: Request, who: str) -> Response:
        if len(request.body) > MAX_JOIN_BODY:
            return await self._refused(Refusal(413, "body_too_large",
                                               f"requests are limited to {MAX_JOIN_BODY} bytes"),
                                       "join", who)
        parsed = parse_join_request(request.body)
        if isinstance(parsed, Refusal):
            return await self._refused(parsed, "join", who)

        def transaction() -> tuple[dict[str, Any] | Refusal, str | None]:
            now = self._clock()
            material = self._materials.get()
            with self._db.transaction() as txn:
                record, refusal = store.redeem(txn, parsed.token, node=parsed.node,
                                               services=sorted(parsed.public_keys), now=now,
                                               ca_dir=str(self._db.directory))
                token_id = record.token_id if record is not None else None
                if refusal is not None or record is None:
                    refusal = refusal or Refusal(401, "invalid_token", "invalid token")
                    txn.audit.append(_refusal_event(refusal, "join", now, f"node/{parsed.node}",
                                                    who, token_id=token_id))
                    return refusal, token_id
                node = ledger.record_join(txn.ledger, record, now)
                actor = f"node/{parsed.node}@{who} (token {token_id})"
                return self._issue(txn, material, node, parsed, now, actor), token_id

        try:
            result, token_id = await trio.to_thread.run_sync(transaction)
        except CAError as exc:
            log.error("join from %s failed: %s", who, exc)
            return _refuse(Refusal(500, "internal", "the CA cannot read or write its state"))
        self.metrics.answered("join", result)
        if isinstance(result, Refusal):
            _log_refusal(result, "join", f"node {parsed.node!r} from {who} "
                         f"(token {token_id or '-'})")
            return _refuse(result)
        return Response.json(result)

    async def _renew(self, request: Request) -> Response:
        who = _peer_address(request)
        peer = PeerCertificate.from_der(request.peer_cert_der)
        if len(request.body) > MAX_JOIN_BODY:
            return await self._refused(Refusal(413, "body_too_large",
                                               f"requests are limited to {MAX_JOIN_BODY} bytes"),
                                       "renew", who)

        def decide(txn: store.Transaction, material: CAMaterial, now: datetime
                   ) -> tuple[ledger.RenewalGrant, CertRequest] | Refusal:
            grant = ledger.authorize_renewal(
                txn.ledger, trust_domain=material.trust_domain,
                peer_ids=peer.spiffe_ids if peer else None,
                peer_serial=peer.serial if peer else None,
                peer_not_after=peer.not_after if peer else None, now=now)
            if isinstance(grant, Refusal):
                return grant
            parsed = parse_renew_request(request.body, grant.node.name)
            if isinstance(parsed, Refusal):
                return parsed
            return ledger.refuse_services(grant.node, parsed.public_keys) or (grant, parsed)

        def transaction() -> dict[str, Any] | Refusal:
            now = self._clock()
            material = self._materials.get()
            with self._db.transaction() as txn:
                decision = decide(txn, material, now)
                if isinstance(decision, Refusal):
                    what = ", ".join(peer.spiffe_ids) if peer else "no client certificate"
                    txn.audit.append(_refusal_event(decision, "renew", now, what, who,
                                                    serial=peer.serial if peer else None))
                    return decision
                grant, parsed = decision
                ledger.confirm(txn.ledger, grant.node.name, grant.peer_serial)
                actor = f"node/{grant.node.name}@{who} (certificate {grant.peer_serial})"
                return self._issue(txn, material, grant.node, parsed, now, actor)

        try:
            result = await trio.to_thread.run_sync(transaction)
        except CAError as exc:
            log.error("renewal from %s failed: %s", who, exc)
            return _refuse(Refusal(500, "internal", "the CA cannot read or write its state"))
        self.metrics.answered("renew", result)
        if isinstance(result, Refusal):
            ids = ", ".join(peer.spiffe_ids) if peer else "no client certificate"
            _log_refusal(result, "renewal", f"{ids} from {who}")
            return _refuse(result)
        return Response.json(result)

    # -- issuance --------------------------------------------------------------------------------

    def _issue(self, txn: store.Transaction, material: CAMaterial, node: NodeRecord,
               request: CertRequest, now: datetime, who: str) -> dict[str, Any] | Refusal:
        """Sign one batch (the node certificate and each service's) and record it (blocking,
        inside the caller's transaction)."""
        td = material.trust_domain
        lifetime = material.settings.leaf_lifetime
        batch = ledger.next_batch(txn.ledger, node.name)
        wanted: list[tuple[Kind, str, ec.EllipticCurvePublicKey]] = [
            (Kind.NODE, node.name, request.node_key),
            *((Kind.SERVICE, s, request.public_keys[s]) for s in sorted(request.public_keys)),
        ]
        answers: dict[str, Any] = {}
        for kind, name, key in wanted:
            try:
                cert = issuer.issue_identity(material.signer, key, kind=kind, name=name,
                                             trust_domain=td, now=now, lifetime=lifetime,
                                             backdate=backdate_for(lifetime))
            except ValueError as exc:  # the root has expired
                log.error("cannot issue %s: %s", spiffe_id_of(td, kind, name), exc)
                raise CAError(str(exc)) from exc
            record = IssuedRecord(keys.serial_hex(cert), kind, name, node.name,
                                  material.fingerprint, now, cert.not_valid_after_utc, batch)
            ledger.record_issued(txn.ledger, record)
            spiffe_id = spiffe_id_of(td, kind, name)
            txn.audit.append(audit.event("issue", now=now, who=who, what=spiffe_id,
                                         serial=record.serial, not_after=record.not_after,
                                         root=record.root, batch=batch))
            answers[f"{kind.value}/{name}"] = {
                "cert_pem": issuer.chain_pem(cert, material.signer).decode(),
                "serial": record.serial,
                "not_after": timestamps.format_time(record.not_after),
                "spiffe_id": spiffe_id,
            }
            log.info("issued %s to %s: serial %s, valid until %s", spiffe_id, who,
                     record.serial, timestamps.format_time(record.not_after))
        return {
            "trust_domain": td,
            "roots": roots_pem(material),
            "node_certificate": answers.pop(f"node/{node.name}"),
            "certificates": {k.removeprefix("svc/"): v for k, v in answers.items()},
        }

    async def _refused(self, refusal: Refusal, action: str, who: str, *,
                       count: bool = True) -> Response:
        """A refusal decided before any transaction (malformed request): log, count, audit,
        answer."""
        _log_refusal(refusal, action, f"request from {who}")
        if count:
            self.metrics.refused.labels(action, refusal.code).inc()
        record = _refusal_event(refusal, action, self._clock(), "", who)
        try:
            await trio.to_thread.run_sync(audit.append, self._db.directory, [record])
        except OSError as exc:
            log.error("cannot append to the audit log: %s", exc)
        return _refuse(refusal)


def backdate_for(lifetime: timedelta) -> timedelta:
    """Leaves are valid from a little before issuance (clock skew between hosts): a minute, but
    at most 5% of a short lifetime, so the renewal schedule (fractions of the lifetime counted
    from notBefore) still means what it says."""
    return min(issuer.DEFAULT_BACKDATE, lifetime * 0.05)


def _refusal_event(refusal: Refusal, action: str, now: datetime, what: str, who: str,
                   **fields: Any) -> dict[str, Any]:
    return audit.event("refuse", now=now, who=who, what=what, request=action,
                       code=refusal.code, reason=refusal.reason, **fields)


def _log_refusal(refusal: Refusal, action: str, about: str) -> None:
    log.warning("%s refused for %s: %s: %s", action, about, refusal.code, refusal.reason)


def _peer_address(request: Request) -> str:
    return f"{request.remote[0]}:{request.remote[1]}" if request.remote else "?"


def _refuse(refusal: Refusal) -> Response:
    return Response.json({"error": refusal.code, "reason": refusal.reason}, refusal.status)


async def serve_ca(
    directory: str | os.PathLike[str],
    host: str,
    port: int,
    *,
    extra_hosts: Iterable[str] = (),
    clock: Clock = utc_now,
    limits: ListenerLimits = DEFAULT_LIMITS,
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
    tls = ServerTLS(hosts)
    tls.update(material, clock())
    materials = MaterialCache(directory, material)
    service = CAService(materials, CADatabase(directory), clock)

    bind_error: OSError | None = None
    async with trio.open_nursery() as nursery:
        try:
            listeners = await nursery.start(
                partial(
                    serve_http, service.handle, host, port,
                    ssl_context=tls.front, max_body=MAX_HTTP_BODY, limits=limits,
                    listener="ca",
                )
            )
        except OSError as exc:
            # Raised outside the nursery so callers see a CAError, not an exception group.
            bind_error = exc
        else:
            nursery.start_soon(maintain_tls, tls, materials, clock)
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
