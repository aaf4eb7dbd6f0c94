"""SPIFFE IDs as meshd uses them. Pure.

Three kinds, one path segment each, the name being a mesh name (``meshd.names``):

* ``spiffe://<trust-domain>/svc/<service>``     workloads (the data plane only ever accepts these)
* ``spiffe://<trust-domain>/node/<node>``       a host's meshd: renews with it, serves admin TLS
* ``spiffe://<trust-domain>/operator/<name>``   people and tools calling admin APIs

The syntax follows the SPIFFE ID specification (lower-case trust domain of letters, digits, ``.``,
``-``, ``_``; path segments of letters, digits, ``.``, ``-``, ``_``), narrowed to these shapes, so
that a peer's identity is either exactly one of them or nothing.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

from meshd.names import MAX_NAME, NAME_RULE, is_valid_name

SCHEME = "spiffe://"
SERVICE_PATH = "/svc/"

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
MAX_TRUST_DOMAIN = 255


class Kind(StrEnum):
    """What an identity names: the first path segment of its SPIFFE ID."""

    SERVICE = "svc"
    NODE = "node"
    OPERATOR = "operator"


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


def spiffe_id_of(trust_domain: str, kind: Kind, name: str) -> str:
    """``spiffe_id_of("example.org", Kind.NODE, "host-1")`` -> ``"spiffe://example.org/node/host-1"``."""
    check_trust_domain(trust_domain)
    check_name(name, "service" if kind is Kind.SERVICE else kind.value)
    return f"{SCHEME}{trust_domain}/{kind.value}/{name}"


def parse_identity(uri: str) -> tuple[str, Kind, str]:
    """``"spiffe://example.org/node/h1"`` -> ``("example.org", Kind.NODE, "h1")``.

    Raises ValueError for anything that is not exactly a meshd identity (other schemes, ports,
    user info, queries, fragments, other paths, upper-case trust domains...).
    """
    if not uri.startswith(SCHEME):
        raise ValueError(f"not a SPIFFE ID (expected {SCHEME}...): {uri!r}")
    rest = uri[len(SCHEME):]
    trust_domain, sep, path = rest.partition("/")
    if not sep:
        raise ValueError(f"SPIFFE ID has no path: {uri!r}")
    segment, sep, name = path.partition("/")
    kinds = {k.value: k for k in Kind}
    if not sep or segment not in kinds:
        raise ValueError(f"SPIFFE ID is not a meshd identity (/svc/, /node/ or /operator/ NAME): "
                         f"{uri!r}")
    kind = kinds[segment]
    try:
        check_trust_domain(trust_domain)
        check_name(name, "service" if kind is Kind.SERVICE else kind.value)
    except ValueError as exc:
        raise ValueError(f"invalid SPIFFE ID {uri!r}: {exc}") from None
    return trust_domain, kind, name


def parse_spiffe_id(uri: str) -> tuple[str, str]:
    """``"spiffe://example.org/svc/web"`` -> ``("example.org", "web")``.

    Raises ValueError for anything that is not exactly a meshd *service* identity (node and
    operator identities included: they never call services).
    """
    trust_domain, kind, name = parse_identity(uri)
    if kind is not Kind.SERVICE:
        raise ValueError(f"SPIFFE ID is not a meshd service identity (/svc/NAME): {uri!r}")
    return trust_domain, name


class NotAnOperator(ValueError):
    """Why a certificate's SPIFFE IDs do not name an operator of a trust domain; ``code`` is
    ``wrong_identity``, ``foreign_trust_domain`` or ``not_an_operator``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def operator_of(ids: list[str], trust_domain: str) -> str:
    """The operator name in a certificate's SPIFFE IDs: exactly one, of the form
    ``spiffe://<trust_domain>/operator/NAME``. Raises ``NotAnOperator``. Used for the admin
    API's clients and for the signers of the mesh config."""
    if len(ids) != 1:
        raise NotAnOperator("wrong_identity", f"certificate carries {len(ids)} SPIFFE IDs, "
                            "expected one operator identity")
    try:
        domain, kind, name = parse_identity(ids[0])
    except ValueError as exc:
        raise NotAnOperator("wrong_identity", f"identity refused: {exc}") from None
    if domain != trust_domain:
        raise NotAnOperator("foreign_trust_domain",
                            f"{ids[0]} is not of trust domain {trust_domain}")
    if kind is not Kind.OPERATOR:
        raise NotAnOperator("not_an_operator", f"{ids[0]} is not an operator "
                            "(`meshd ca issue --operator NAME`)")
    return name


def spiffe_ids_from_cert(cert: x509.Certificate) -> list[str]:
    """The URI SANs of ``cert`` that start with ``spiffe://`` (in certificate order)."""
    from cryptography import x509  # the control plane's (a worker process never loads it)

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
    from cryptography import x509

    return spiffe_ids_from_cert(x509.load_der_x509_certificate(der))
