"""The operator certificate that signs the mesh config, and where an operator's command finds it.

``meshd routes`` and ``meshd tui`` resolve it the same way: ``--operator-cert FILE
--operator-key FILE``, else ``$MESHD_OPERATOR_CERT`` and ``$MESHD_OPERATOR_KEY``, else the
operator certificate of a running ``meshd up`` when the registry is that mesh's (its operator
context). ``meshd up`` passes its own. A meshd never signs: it only verifies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from meshd.errors import ConfigError, Problem
from meshd.identity.spiffe import Kind, parse_identity, spiffe_ids_from_cert
from meshd.registry.consul import context_for

CERT_ENV = "MESHD_OPERATOR_CERT"
KEY_ENV = "MESHD_OPERATOR_KEY"
HOW_TO_SIGN = ("writing the route table needs an operator certificate of the mesh CA to sign "
               "it (`meshd ca issue --operator NAME`): give --operator-cert FILE "
               f"--operator-key FILE, or set ${CERT_ENV} and ${KEY_ENV} (a running `meshd up` "
               "gives its own for its registry)")


@dataclass(frozen=True)
class OperatorKey:
    """An operator certificate (PEM, then any chain certificate) and its key (PEM)."""

    cert_pem: bytes
    key_pem: bytes
    trust_domain: str
    name: str

    @classmethod
    def from_pems(cls, cert_pem: bytes, key_pem: bytes, source: str = "operator") -> OperatorKey:
        """ConfigError unless ``cert_pem`` is an operator certificate (the key is checked
        against it when signing)."""
        try:
            cert = x509.load_pem_x509_certificates(cert_pem)[0]
            ids = spiffe_ids_from_cert(cert)
        except (ValueError, IndexError) as exc:
            raise ConfigError([Problem(source, "operator-cert",
                                       f"not a certificate: {exc}")]) from exc
        try:
            trust_domain, kind, name = parse_identity(ids[0]) if len(ids) == 1 else ("", None, "")
        except ValueError:
            kind = None
        if kind is not Kind.OPERATOR:
            raise ConfigError([Problem(source, "operator-cert", "not an operator certificate "
                                       f"({', '.join(ids) or 'no SPIFFE ID'}); issue one with "
                                       "`meshd ca issue --operator NAME`")])
        return cls(cert_pem, key_pem, trust_domain, name)

    @classmethod
    def from_files(cls, cert: Path, key: Path) -> OperatorKey:
        try:
            cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
        except OSError as exc:
            raise ConfigError([Problem(str(exc.filename or cert), "operator-cert",
                                       f"cannot read: {exc.strerror or exc}")]) from exc
        return cls.from_pems(cert_pem, key_pem, str(cert))


def operator_key(cert: Path | None, key: Path | None, url: str,
                 environ: Mapping[str, str] | None = None) -> OperatorKey | None:
    """The operator certificate an operator's command talking to the registry at ``url``
    signs with (see the module comment); None when none is given (reads need none)."""
    env = os.environ if environ is None else environ
    if cert is None and key is None and env.get(CERT_ENV) and env.get(KEY_ENV):
        cert, key = Path(env[CERT_ENV]), Path(env[KEY_ENV])
    if cert is not None or key is not None:
        if cert is None or key is None:
            raise ConfigError([Problem("command line", "operator-cert",
                                       "--operator-cert and --operator-key go together")])
        return OperatorKey.from_files(cert, key)
    context = context_for(url)
    if context is None or context.operator is None:
        return None
    return OperatorKey.from_files(context.operator.cert, context.operator.key)
