"""The CA client the per-host daemon uses: join once, then renew and watch the trust bundle and
the deny list with its node certificate.

Trust on first contact works like kubeadm's discovery hash: the roots are fetched over TLS
*without* verification, and accepted only if one of them has the SHA-256 fingerprint the operator
configured (``ca_fingerprint`` in meshd.toml). Every later request runs over TLS verified against
exactly that bundle, with hostname checking; after the join, against the bundle the host keeps
on disk (which follows root rotations: each new bundle is fetched over TLS verified by the one
before). Private keys are generated here and never sent.
"""

from __future__ import annotations

import math
import os
import re
import ssl
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from meshd.errors import CAError
from meshd.identity import keys
from meshd.identity.certs import Identity, JoinResult, TrustBundle
from meshd.identity.spiffe import Kind, check_name, spiffe_id_of, spiffe_ids_from_cert

__all__ = [
    "CAConnection",
    "CARefusedError",
    "DenyList",
    "Identity",
    "JoinResult",
    "RenewAsked",
    "TrustBundle",
    "fetch_roots",
    "join",
    "normalize_fingerprint",
    "select_pinned",
]

# Per network operation (connect, each read/write). Callers bound a whole call with
# trio.fail_after / move_on_after where they make it.
REQUEST_TIMEOUT = 10.0
_FINGERPRINT = re.compile(r"sha256:([0-9a-f]{64})")


class CARefusedError(CAError):
    """The CA answered with a refusal. ``status`` 401/403 need an operator (a new or different
    token); 5xx may pass with a retry."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        self.status = status
        self.code = code
        self.reason = reason
        super().__init__(f"the CA refused the request: {reason} (HTTP {status} {code})")


def normalize_fingerprint(fingerprint: str) -> str:
    """``"SHA256:AB.."`` -> ``"sha256:ab.."``; raises CAError unless it is sha256 + 64 hex."""
    value = fingerprint.strip().lower()
    if not _FINGERPRINT.fullmatch(value):
        raise CAError(f"invalid CA fingerprint {fingerprint!r}: expected sha256:<64 hex digits>")
    return value


async def fetch_roots(ca_url: str, fingerprint: str) -> TrustBundle:
    """The CA's trust bundle, accepted only if one root matches ``fingerprint``.

    Two requests: the first, unverified, yields only the root that matches the pin (anything
    else it carried could have been added by someone in the middle); the second, verified
    against that root alone, yields the full bundle (e.g. the old and new roots during a root
    rotation) from a server that proved it holds a certificate from the pinned CA.

    Raises CAError naming the expected and actual fingerprints on a mismatch, and for
    connection failures and malformed answers.
    """
    pin = normalize_fingerprint(fingerprint)
    base = _base_url(ca_url)
    async with httpx.AsyncClient(verify=_unverified_context(), timeout=REQUEST_TIMEOUT) as http:
        body = await _request_json(http, "GET", f"{base}/v1/ca/roots")
    pinned = select_pinned(_bundle_from(body, base), pin, f"the CA at {base}")
    async with httpx.AsyncClient(verify=_verified_context(pinned), timeout=REQUEST_TIMEOUT) as http:
        body = await _request_json(http, "GET", f"{base}/v1/ca/roots")
    bundle = _bundle_from(body, base)
    select_pinned(bundle, pin, f"the CA at {base}")
    return bundle


def select_pinned(bundle: TrustBundle, pin: str, where: str = "the CA") -> TrustBundle:
    """The bundle cut down to the root whose fingerprint is ``pin``; raises CAError naming the
    expected and the actual fingerprints when none matches."""
    pin = normalize_fingerprint(pin)
    matching = tuple(
        pem for pem, fp in zip(bundle.roots_pem, bundle.fingerprints(), strict=True) if fp == pin
    )
    if not matching:
        raise CAError(
            f"{where} is not the pinned CA: expected root fingerprint {pin}, "
            f"it presented {', '.join(bundle.fingerprints())}"
        )
    return TrustBundle(bundle.trust_domain, matching)


async def join(
    ca_url: str,
    *,
    token: str,
    node: str,
    services: Sequence[str],
    fingerprint: str,
) -> JoinResult:
    """Join the mesh as ``node``: one locally generated P-256 key and certificate per service,
    and one for the node itself.

    Raises CARefusedError when the CA says no (with its reason), CAError for everything else
    (unreachable CA, pin mismatch, an answer that does not match what was asked).
    """
    names = _check_services(services)
    try:
        check_name(node, "node")
    except ValueError as exc:
        raise CAError(str(exc)) from None
    bundle = await fetch_roots(ca_url, fingerprint)
    pin = normalize_fingerprint(fingerprint)
    base = _base_url(ca_url)
    requests = await trio.to_thread.run_sync(_keys_and_csrs, bundle.trust_domain, node, names)
    payload = {"token": token, "node": node, **_csr_payload(requests)}
    async with httpx.AsyncClient(verify=_verified_context(bundle), timeout=REQUEST_TIMEOUT) as http:
        body = await _request_json(http, "POST", f"{base}/v1/ca/join", payload)
    answered = _bundle_from(body, base)
    select_pinned(answered, pin, f"the CA at {base}")
    return _result(body, requests, answered, bundle.trust_domain, node, base)


@dataclass(frozen=True)
class DenyList:
    """Serials (hex, as ``keys.serial_hex``) the CA has revoked, the list's version, and the
    fingerprints of the roots the CA's bundle holds now (empty: unknown, fetch the roots)."""

    version: int
    serials: frozenset[str]
    roots: frozenset[str] = frozenset()
    renew: RenewAsked | None = None


@dataclass(frozen=True)
class RenewAsked:
    """The operator asked the holder of node certificate ``serial`` (issued before ``before``)
    to renew now, at a random point within ``spread_seconds`` (``meshd ca rotate --finish``)."""

    serial: str
    before: str
    spread_seconds: float


class CAConnection:
    """The daemon's channel to the CA after the join: TLS verified against the bundle in
    ``bundle_file`` and, when ``node_files`` (certificate, key) are given, the node certificate as
    client certificate. Call ``reload()`` after those files changed, ``aclose()`` at the end."""

    def __init__(self, ca_url: str, trust_domain: str, bundle_file: Path,
                 node_files: tuple[Path, Path] | None = None) -> None:
        self.base = _base_url(ca_url)
        self.trust_domain = trust_domain
        self._bundle_file = bundle_file
        self._node_files = node_files
        self._http: httpx.AsyncClient | None = None

    async def reload(self, node_files: tuple[Path, Path] | None) -> None:
        """Use these files (and the bundle file as it is now) from the next request on."""
        self._node_files = node_files
        await self.aclose()

    async def aclose(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(verify=self._context(), timeout=REQUEST_TIMEOUT)
        return self._http

    def _context(self) -> ssl.SSLContext:
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_verify_locations(cafile=os.fspath(self._bundle_file))
            if self._node_files is not None:
                cert, key = self._node_files
                context.load_cert_chain(os.fspath(cert), os.fspath(key))
        except (OSError, ssl.SSLError) as exc:
            raise CAError(f"cannot set up TLS to the CA: {exc}") from exc
        return context

    async def renew(self, node: str, services: Sequence[str]) -> JoinResult:
        """New keys and certificates for ``services`` and the node, authenticated by the node
        certificate. Raises CARefusedError (the CA said no) or CAError."""
        if self._node_files is None:
            raise CAError("renewing needs the node certificate")
        names = _check_services(services)
        requests = await trio.to_thread.run_sync(_keys_and_csrs, self.trust_domain, node, names)
        body = await _request_json(self._client(), "POST", f"{self.base}/v1/ca/renew",
                                   _csr_payload(requests))
        answered = _bundle_from(body, self.base)
        return _result(body, requests, answered, self.trust_domain, node, self.base)

    async def roots(self) -> TrustBundle:
        """The CA's current bundle (old and new roots during a rotation)."""
        body = await _request_json(self._client(), "GET", f"{self.base}/v1/ca/roots")
        bundle = _bundle_from(body, self.base)
        if bundle.trust_domain != self.trust_domain:
            raise CAError(f"the CA at {self.base} serves trust domain {bundle.trust_domain!r}, "
                          f"not {self.trust_domain!r}")
        return bundle

    async def denylist(self) -> DenyList:
        body = await _request_json(self._client(), "GET", f"{self.base}/v1/ca/denylist")
        version = body.get("version")
        serials, roots = _strings(body.get("serials")), _strings(body.get("roots", []))
        if not isinstance(version, int) or serials is None or roots is None:
            raise CAError(f"malformed deny list from the CA at {self.base}")
        return DenyList(version, frozenset(s.lower() for s in serials), frozenset(roots),
                        _renew_asked(body.get("renew"), self.base))


def _renew_asked(value: object, base: str) -> RenewAsked | None:
    """The deny list's ``renew`` member (None when absent); CAError when malformed."""
    if value is None:
        return None
    malformed = CAError(f"malformed renewal request in the deny list from the CA at {base}")
    if not isinstance(value, dict):
        raise malformed
    serial, before, spread = value.get("serial"), value.get("before"), value.get("spread_seconds")
    if (not isinstance(serial, str) or not isinstance(before, str)
            or isinstance(spread, bool) or not isinstance(spread, int | float)
            or not math.isfinite(spread) or spread < 0):
        raise malformed
    return RenewAsked(serial.lower(), before, float(spread))


def _strings(value: object) -> list[str] | None:
    """``value`` if it is a list of strings, else None."""
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def _csr_payload(requests: Mapping[tuple[Kind, str], tuple[bytes, str]]) -> dict[str, Any]:
    return {
        "csrs": {name: csr for (kind, name), (_, csr) in requests.items()
                 if kind is Kind.SERVICE},
        "node_csr": next(csr for (kind, _), (_, csr) in requests.items() if kind is Kind.NODE),
    }


def _result(
    body: Mapping[str, Any],
    requests: Mapping[tuple[Kind, str], tuple[bytes, str]],
    answered: TrustBundle,
    trust_domain: str,
    node: str,
    base: str,
) -> JoinResult:
    # The connection was verified, but check the answer is what was asked for anyway: a CA bug
    # here would otherwise surface much later as a failed mTLS handshake.
    if answered.trust_domain != trust_domain:
        raise CAError(
            f"the CA at {base} changed trust domain from {trust_domain!r} to "
            f"{answered.trust_domain!r} between requests"
        )
    issued = body.get("certificates")
    if not isinstance(issued, dict):
        raise CAError(f"malformed answer from {base}: no 'certificates' object")
    roots = answered.certificates()
    identities: dict[str, Identity] = {}
    node_identity: Identity | None = None
    for (kind, name), (key_pem, _) in requests.items():
        entry = body.get("node_certificate") if kind is Kind.NODE else issued.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("cert_pem"), str):
            raise CAError(f"the CA at {base} returned no certificate for {kind.value} {name!r}")
        identity = _identity(entry["cert_pem"].encode(), key_pem, kind, name,
                             answered.trust_domain, roots, base)
        if kind is Kind.NODE:
            node_identity = identity
        else:
            identities[name] = identity
    assert node_identity is not None
    return JoinResult(
        trust_domain=answered.trust_domain,
        bundle=answered,
        identities=types.MappingProxyType(identities),
        node=node_identity,
    )


def _identity(
    cert_pem: bytes,
    key_pem: bytes,
    kind: Kind,
    name: str,
    trust_domain: str,
    roots: list[x509.Certificate],
    base: str,
) -> Identity:
    expected = spiffe_id_of(trust_domain, kind, name)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        identity = Identity.from_pem(cert_pem, key_pem, kind)
    except ValueError as exc:
        raise CAError(f"the CA at {base} returned an unusable certificate for "
                      f"{name!r}: {exc}") from exc
    if spiffe_ids_from_cert(cert) != [expected]:
        raise CAError(f"the CA at {base} returned a certificate for {spiffe_ids_from_cert(cert)}, "
                      f"expected [{expected!r}]")
    if not keys.verify_issued_by(cert, roots):
        raise CAError(f"the certificate for {name!r} is not signed by the CA's roots")
    return identity


def _keys_and_csrs(
    trust_domain: str, node: str, services: Sequence[str]
) -> dict[tuple[Kind, str], tuple[bytes, str]]:
    """A new key (PEM) and a CSR for it, for the node and per service. CPU-bound: runs in a
    worker thread."""
    out: dict[tuple[Kind, str], tuple[bytes, str]] = {}
    for kind, name in [(Kind.NODE, node), *((Kind.SERVICE, s) for s in services)]:
        key = keys.new_private_key()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(spiffe_id_of(trust_domain, kind, name))]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        out[(kind, name)] = (keys.private_key_pem(key), csr.public_bytes(Encoding.PEM).decode())
    return out


def _check_services(services: Sequence[str]) -> list[str]:
    if isinstance(services, str):
        raise CAError("services must be a sequence of names, not a string")
    try:
        names = list(dict.fromkeys(check_name(s) for s in services))
    except ValueError as exc:
        raise CAError(str(exc)) from None
    if not names:
        raise CAError("join needs at least one service")
    return names


def _bundle_from(body: Mapping[str, Any], base: str) -> TrustBundle:
    trust_domain = body.get("trust_domain")
    roots = body.get("roots")
    if not isinstance(trust_domain, str) or not isinstance(roots, list) or not all(
        isinstance(r, str) for r in roots
    ):
        raise CAError(f"malformed answer from the CA at {base}: no trust_domain/roots")
    try:
        return TrustBundle.from_pems(trust_domain, [r.encode() for r in roots])
    except ValueError as exc:
        raise CAError(f"malformed trust bundle from the CA at {base}: {exc}") from exc


async def _request_json(
    http: httpx.AsyncClient, method: str, url: str, payload: Any = None
) -> dict[str, Any]:
    try:
        response = await http.request(method, url, json=payload)
    except httpx.HTTPError as exc:
        raise CAError(f"cannot reach the CA at {url}: {exc or type(exc).__name__}") from exc
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200:
        if isinstance(body, dict) and isinstance(body.get("reason"), str):
            raise CARefusedError(response.status_code, str(body.get("error", "")), body["reason"])
        text = response.text.strip()[:200] or response.reason_phrase
        raise CARefusedError(response.status_code, "http_error", text)
    if not isinstance(body, dict):
        raise CAError(f"the CA at {url} answered with something other than a JSON object")
    return body


def _base_url(ca_url: str) -> str:
    url = ca_url.strip().rstrip("/")
    if not url.startswith("https://"):
        raise CAError(f"the CA URL must start with https://, got {ca_url!r}")
    return url


def _unverified_context() -> ssl.SSLContext:
    # Only for /v1/ca/roots, whose answer is checked against the pin before it is used.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _verified_context(bundle: TrustBundle) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + hostname checks
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cadata=bundle.pem().decode())
    return context
