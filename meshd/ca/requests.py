"""The CA API's requests, pure: a join or renewal body in, the public keys to certify (or a
``Refusal`` saying why not) out; and what the CA reads from a client certificate."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshd.ca import issuer
from meshd.ca.tokens import Refusal
from meshd.identity import keys
from meshd.identity.spiffe import check_name, spiffe_ids_from_cert

MAX_SERVICES_PER_JOIN = 64


@dataclass(frozen=True)
class CertRequest:
    """A parsed join or renewal: the public keys to certify (the token only for a join)."""

    token: str
    node: str
    node_key: ec.EllipticCurvePublicKey
    public_keys: Mapping[str, ec.EllipticCurvePublicKey]


JoinRequest = CertRequest  # the name earlier callers used


def parse_join_request(body: bytes) -> CertRequest | Refusal:
    """Validate a join body (pure). A missing token is a 401; anything else malformed is a 400."""
    obj = _json_object(body)
    if isinstance(obj, Refusal):
        return obj
    token = obj.get("token")
    if not isinstance(token, str) or not token:
        return Refusal(401, "missing_token", "a join token is required")
    node = obj.get("node")
    if not isinstance(node, str):
        return Refusal(400, "bad_request", "'node' must be a string")
    try:
        check_name(node, "node")
    except ValueError as exc:
        return Refusal(400, "bad_request", str(exc))
    return _parse_csrs(obj, token=token, node=node)


def parse_renew_request(body: bytes, node: str) -> CertRequest | Refusal:
    """Validate a renewal body (pure); the node is the one the client certificate names."""
    obj = _json_object(body)
    if isinstance(obj, Refusal):
        return obj
    if "token" in obj:
        return Refusal(400, "bad_request",
                       "renewals are authenticated by the node certificate, not a join token")
    return _parse_csrs(obj, token="", node=node)


def _json_object(body: bytes) -> dict[str, Any] | Refusal:
    try:
        obj = json.loads(body)
    except ValueError:
        return Refusal(400, "bad_request", "the request body is not valid JSON")
    if not isinstance(obj, dict):
        return Refusal(400, "bad_request", "the request body must be a JSON object")
    return obj


def _parse_csrs(obj: Mapping[str, Any], *, token: str, node: str) -> CertRequest | Refusal:
    csrs = obj.get("csrs")
    if not isinstance(csrs, dict) or not csrs:
        return Refusal(400, "bad_request", "'csrs' must be an object mapping service to CSR PEM")
    if len(csrs) > MAX_SERVICES_PER_JOIN:
        return Refusal(400, "bad_request", f"at most {MAX_SERVICES_PER_JOIN} services per request")
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
    node_csr = obj.get("node_csr")
    if not isinstance(node_csr, str):
        return Refusal(400, "bad_request", "'node_csr' must be the PEM CSR of the node's key")
    try:
        node_key = issuer.check_csr(issuer.load_csr_pem(node_csr.encode()))
    except issuer.CSRRejected as exc:
        return Refusal(400, "bad_csr", f"the node's CSR refused: {exc}")
    return CertRequest(token=token, node=node, node_key=node_key, public_keys=keys)


@dataclass(frozen=True)
class PeerCertificate:
    """What the CA reads from a TLS-verified client certificate."""

    spiffe_ids: list[str]
    serial: str
    not_after: datetime

    @classmethod
    def from_der(cls, der: bytes | None) -> PeerCertificate | None:
        if not der:
            return None
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return None
        return cls(spiffe_ids_from_cert(cert), keys.serial_hex(cert), cert.not_valid_after_utc)
