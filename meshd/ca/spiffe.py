"""SPIFFE IDs as meshd uses them: ``spiffe://<trust-domain>/svc/<service>``. Pure.

The syntax follows the SPIFFE ID specification (lower-case trust domain of letters, digits, ``.``,
``-``, ``_``; path segments of letters, digits, ``.``, ``-``, ``_``), narrowed to the one shape
meshd issues, so that a peer's identity is either exactly a meshd service or nothing: the service
segment is a mesh name (``meshd.names``, the rule the config files use).
"""

from __future__ import annotations

import re

from cryptography import x509

from meshd.names import MAX_NAME, NAME_RULE, is_valid_name

SCHEME = "spiffe://"
SERVICE_PATH = "/svc/"

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
MAX_TRUST_DOMAIN = 255


def check_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` if it is a valid SPIFFE trust domain, else raise ValueError."""
    if not trust_domain:
        raise ValueError("trust domain is empty")
    if len(trust_domain) > MAX_TRUST_DOMAIN:
        raise ValueError(f"trust domain is longer than {MAX_TRUST_DOMAIN} characters")
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ValueError(
            f"invalid trust domain {trust_domain!r}: use lower-case letters, digits, '.', '-', '_'"
        )
    return trust_domain


def check_name(name: str, what: str = "service") -> str:
    """Return ``name`` if it is a valid service (or node) name, else raise ValueError.

    Names follow the mesh-wide rule of ``meshd.names`` (a lower-case DNS label), which also makes
    them valid SPIFFE path segments.
    """
    if not name:
        raise ValueError(f"{what} name is empty")
    if len(name) > MAX_NAME:
        raise ValueError(f"{what} name {name[:20]!r}... is longer than {MAX_NAME} characters")
    if not is_valid_name(name):
        raise ValueError(f"invalid {what} name {name!r}: {NAME_RULE}")
    return name


def spiffe_id_for(trust_domain: str, service: str) -> str:
    """``spiffe_id_for("example.org", "web")`` -> ``"spiffe://example.org/svc/web"``."""
    check_trust_domain(trust_domain)
    check_name(service)
    return f"{SCHEME}{trust_domain}{SERVICE_PATH}{service}"


def parse_spiffe_id(uri: str) -> tuple[str, str]:
    """``"spiffe://example.org/svc/web"`` -> ``("example.org", "web")``.

    Raises ValueError for anything that is not exactly a meshd service identity (other schemes,
    ports, user info, queries, fragments, other paths, upper-case trust domains...).
    """
    if not uri.startswith(SCHEME):
        raise ValueError(f"not a SPIFFE ID (expected {SCHEME}...): {uri!r}")
    rest = uri[len(SCHEME):]
    trust_domain, sep, path = rest.partition("/")
    if not sep:
        raise ValueError(f"SPIFFE ID has no path: {uri!r}")
    if not path.startswith(SERVICE_PATH[1:]):
        raise ValueError(f"SPIFFE ID is not a meshd service identity (/svc/NAME): {uri!r}")
    service = path[len(SERVICE_PATH) - 1:]
    try:
        check_trust_domain(trust_domain)
        check_name(service)
    except ValueError as exc:
        raise ValueError(f"invalid SPIFFE ID {uri!r}: {exc}") from None
    return trust_domain, service


def spiffe_ids_from_cert(cert: x509.Certificate) -> list[str]:
    """The URI SANs of ``cert`` that start with ``spiffe://`` (in certificate order)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
            if uri.startswith(SCHEME)]


def spiffe_ids_from_cert_der(der: bytes) -> list[str]:
    """The SPIFFE URI SANs of a DER certificate (what ``SSLObject.getpeercert(True)`` returns).

    Raises ValueError if ``der`` is not a certificate.
    """
    return spiffe_ids_from_cert(x509.load_der_x509_certificate(der))
