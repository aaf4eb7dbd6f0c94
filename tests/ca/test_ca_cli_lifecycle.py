"""``meshd ca token|issue|revoke|rotate`` as an operator runs them (child processes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cryptography import x509
from test_ca_cli import meshd, mode

from meshd.ca import audit
from meshd.ca.store import load_ca
from meshd.identity.spiffe import spiffe_ids_from_cert


@pytest.mark.e2e
def test_rotation_revocation_and_operator_certificates(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    first = meshd("ca", "init", "--dir", ca, "--trust-domain", "mesh.test").stdout.strip()
    token = meshd("ca", "token", "--dir", ca, "--node", "n1", "--services", "web")
    assert json.loads((ca / "tokens.json").read_text())["tokens"][
        token.stdout.split(".")[0]]["uses_left"] == 1  # single use by default

    meshd("ca", "issue", "--dir", ca, "--service", "web", "--out", tmp_path / "svc")
    web = x509.load_pem_x509_certificate((tmp_path / "svc" / "web.crt").read_bytes())
    serial = format(web.serial_number, "x")

    second = meshd("ca", "rotate", "--dir", ca).stdout.strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", second) and second != first
    again = meshd("ca", "rotate", "--dir", ca, check=False)
    assert again.returncode == 1 and "already in progress" in again.stderr

    refused = meshd("ca", "rotate", "--dir", ca, "--finish", check=False)
    assert refused.returncode == 1 and refused.stdout == ""
    assert f"spiffe://mesh.test/svc/web (serial {serial}" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    revoked = meshd("ca", "revoke", "--dir", ca, "--serial", serial)
    assert revoked.stdout.split() == [serial]
    unknown = meshd("ca", "revoke", "--dir", ca, "--node", "ghost", check=False)
    assert unknown.returncode == 1 and "no node 'ghost'" in unknown.stderr
    both = meshd("ca", "revoke", "--dir", ca, "--node", "n1", "--serial", "ab", check=False)
    assert both.returncode == 2  # one or the other

    assert meshd("ca", "rotate", "--dir", ca, "--finish").stdout.strip() == second
    assert load_ca(ca).fingerprint == second and load_ca(ca).previous is None

    meshd("ca", "issue", "--dir", ca, "--operator", "alice", "--out", tmp_path / "ops")
    cert = x509.load_pem_x509_certificate((tmp_path / "ops" / "alice.crt").read_bytes())
    assert spiffe_ids_from_cert(cert) == ["spiffe://mesh.test/operator/alice"]
    assert mode(tmp_path / "ops" / "alice.key") == 0o600

    actions = [(r["action"], r["who"].startswith("cli:")) for r in audit.read(ca)]
    assert [a for a, _ in actions] == ["init", "token", "issue", "rotate",
                                       "rotate_finish_refused", "revoke", "rotate_finish",
                                       "issue"]
    assert all(cli for _, cli in actions)
    assert token.stdout.strip().split(".")[1] not in (ca / "audit.log").read_text()
