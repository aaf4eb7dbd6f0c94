"""The CA's Prometheus series (docs/metrics.md lists them) and ``GET /metrics`` on its HTTPS API.

Only an operator reads them: the request must come with a client certificate (verified by the
TLS handshake against the CA's roots) naming one ``spiffe://<trust domain>/operator/NAME`` and
not revoked; anything else is refused (401 without a certificate, 403 with another). The counts
say nothing secret, but who joins and how often is the mesh's business, and a scraper holding an
operator certificate is what the admin APIs ask for too.

Counted as the API answers: certificates issued (by kind and request), refusals (by request and
reason), join tokens redeemed. Read at each scrape: the deny list's size (from the ledger on
disk: the scrape renders in a worker thread) and each trusted root's expiry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from meshd.ca import ledger
from meshd.ca.requests import PeerCertificate
from meshd.ca.server_tls import MaterialCache
from meshd.ca.store import CADatabase
from meshd.ca.tokens import Refusal
from meshd.errors import CAError
from meshd.identity import keys
from meshd.identity.spiffe import NotAnOperator, operator_of
from meshd.metrics import new_registry

Clock = Callable[[], datetime]


class CAMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, materials: MaterialCache, db: CADatabase, clock: Clock) -> None:
        self.registry = new_registry()
        self._materials = materials
        self._db = db
        self._clock = clock
        r = self.registry
        self.issued = Counter(
            "meshd_ca_certificates_issued", "certificates signed, by kind (node, service) and "
            "request (join: with a token; renew: with the node certificate)",
            ["kind", "request"], registry=r)
        self.refused = Counter(
            "meshd_ca_requests_refused", "requests refused, by request (join, renew, metrics) "
            "and reason (the refusal's error code: invalid_token, token_used, "
            "too_many_attempts, revoked, bad_csr...)", ["request", "reason"], registry=r)
        self.tokens_redeemed = Counter(
            "meshd_ca_join_tokens_redeemed", "join tokens used by a successful join",
            registry=r)
        for kind in ("node", "service"):  # at 0 from the start, for dashboards
            for request in ("join", "renew"):
                self.issued.labels(kind, request)
        r.register(_CAStateCollector(self))

    def answered(self, request: str, result: dict[str, Any] | Refusal) -> None:
        """Count what a join or a renewal came to."""
        if isinstance(result, Refusal):
            self.refused.labels(request, result.code).inc()
            return
        self.issued.labels("node", request).inc()
        if result["certificates"]:
            self.issued.labels("service", request).inc(len(result["certificates"]))
        if request == "join":
            self.tokens_redeemed.inc()

    def reader(self, peer_cert_der: bytes | None) -> str | Refusal:
        """The operator a metrics request comes from, or why it is refused (blocking: reads the
        deny list)."""
        peer = PeerCertificate.from_der(peer_cert_der)
        if peer is None:
            return Refusal(401, "certificate_required", "metrics are for operators: present an "
                           "operator certificate (`meshd ca issue --operator NAME`)")
        try:
            name = operator_of(peer.spiffe_ids, self._materials.current.trust_domain)
        except NotAnOperator as exc:
            return Refusal(403, exc.code, str(exc))
        state = self._db.ledger()
        if peer.serial in ledger.denylist(state, self._clock()):
            return Refusal(403, "revoked", f"certificate {peer.serial} is revoked")
        return name

    def render(self, peer_cert_der: bytes | None) -> bytes | Refusal:
        """The exposition for an operator, or the refusal (blocking: run in a worker thread)."""
        who = self.reader(peer_cert_der)
        if isinstance(who, Refusal):
            self.refused.labels("metrics", who.code).inc()
            return who
        return generate_latest(self.registry)


class _CAStateCollector(Collector):
    def __init__(self, metrics: CAMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        m = self.metrics
        roots = GaugeMetricFamily(
            "meshd_ca_root_expiry_timestamp_seconds", "notAfter (unix time) of each root in "
            "the trust bundle; signing=\"true\" for the one that signs (during a rotation the "
            "previous root is there too)", labels=["fingerprint", "signing"])
        material = m._materials.current
        for root in material.roots():
            roots.add_metric([keys.fingerprint(root),
                              "true" if root is material.signer.cert else "false"],
                             root.not_valid_after_utc.timestamp())
        yield roots
        try:
            state = m._db.ledger()
        except CAError:
            return  # the scrape still shows the roots; the error is in the CA's log already
        yield GaugeMetricFamily("meshd_ca_denylist_serials", "revoked certificates not yet "
                                "expired (what every host refuses)",
                                value=len(ledger.denylist(state, m._clock())))
        yield GaugeMetricFamily("meshd_ca_nodes", "nodes that joined", value=len(state.nodes))
