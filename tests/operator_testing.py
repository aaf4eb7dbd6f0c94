"""Operator certificates for tests that write the mesh config: issued from a test CA directory
(as `meshd ca issue --operator`), and route tables signed as-is (even ones every meshd refuses,
so the refusal under test is the table's, not the signature's)."""

from __future__ import annotations

import functools
import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from meshd.ca.operations import issue_to_directory
from meshd.ca.store import init_ca
from meshd.identity.certs import TrustBundle
from meshd.identity.signing import canonical_bytes, inspect, is_envelope, next_version, sign
from meshd.identity.spiffe import Kind
from meshd.registry.config_store import KIND
from meshd.registry.operator_key import OperatorKey


def issue_operator(ca_dir: Path, out: Path, name: str = "ops") -> OperatorKey:
    """``meshd ca issue --operator NAME --out OUT`` from ``ca_dir``; its files are in ``out``."""
    issued = issue_to_directory(ca_dir, Kind.OPERATOR, name, out, now=datetime.now(UTC))
    return OperatorKey.from_files(issued.cert, issued.key)


@functools.cache
def throwaway_operator() -> OperatorKey:
    """An operator of a CA made for this test process (tests that only need writes signed)."""
    tmp = Path(tempfile.mkdtemp(prefix="meshd-operator-"))
    init_ca(tmp / "ca", "operator.test", now=datetime.now(UTC) - timedelta(hours=1))
    return issue_operator(tmp / "ca", tmp / "out")


def table_in(raw: bytes) -> Any:
    """The table a stored value holds: a signed envelope's data (not verified), else as is."""
    obj = json.loads(raw)
    return inspect(obj, KIND).data if is_envelope(obj) else obj


def bundle_from(ca_file: Path, trust_domain: str) -> TrustBundle:
    return TrustBundle.from_pems(trust_domain, [ca_file.read_bytes()])


def signed_routes(data: Any, signer: OperatorKey, *, version: int | None = None,
                  now: datetime | None = None) -> bytes:
    """``data`` (not validated) in an envelope signed by ``signer``, as stored in KV."""
    at = now or datetime.now(UTC)
    return canonical_bytes(sign(KIND, data, version=version or next_version(at, None), now=at,
                                trust_domain=signer.trust_domain, key_pem=signer.key_pem,
                                cert_pem=signer.cert_pem))
