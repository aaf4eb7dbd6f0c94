"""`meshd ca rotate --finish` when nodes do not renew: it asks them (durably, audited), waits
for its timeout showing progress, then names the nodes left and keeps the previous root.
(With running meshds: tests/identity/test_identity_rotation_finish.py.)"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from meshd.ca import audit, ledger, operations, store, tokens
from meshd.ca.ledger import IssuedRecord
from meshd.identity.spiffe import Kind

TD = "mesh.test"


def test_finish_names_the_nodes_that_did_not_renew_and_keeps_the_previous_root(
    tmp_path: Path,
) -> None:
    d = tmp_path / "ca"
    now = datetime.now(UTC)
    first = store.init_ca(d, TD, now=now)
    with store.CADatabase(d).transaction() as txn:
        for node in ("host-x", "host-y"):
            _, token = tokens.mint(node, ["web"], now=now, ttl=timedelta(hours=1))
            ledger.record_join(txn.ledger, token, now)
            batch = ledger.next_batch(txn.ledger, node)
            ledger.record_issued(txn.ledger, IssuedRecord(
                format(batch * 0x100 + len(txn.ledger.issued) + 1, "x"), Kind.NODE, node, node,
                first.fingerprint, now, now + timedelta(hours=24), batch))
    operations.rotate_ca(d, now=now, who="test")
    progress = operations.rotation_progress(d, now=now)
    assert progress.waiting == progress.nodes == ("host-x", "host-y")

    result = subprocess.run(
        [sys.executable, "-m", "meshd", "ca", "rotate", "--dir", str(d), "--finish",
         "--timeout", "1s", "--spread", "5s"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    assert "asked 2 node(s) still on the previous root to renew now (each within 5s)" \
        in result.stderr
    assert ("2 of 2 node(s) have not renewed onto the new root within 1s: host-x, host-y"
            in result.stderr)
    assert "meshd ca revoke --node NAME" in result.stderr
    assert result.stdout == ""
    assert store.load_ca(d).previous_fingerprint == first.fingerprint  # not retired
    request = store.read_ledger(d).renewal  # durable: nodes down now hear it when back
    assert request is not None and request.root == first.fingerprint
    assert request.spread_seconds == 5.0
    assert [r["action"] for r in audit.read(d)][-1] == "renew_requested"


def test_timeout_and_spread_go_with_finish(tmp_path: Path) -> None:
    store.init_ca(tmp_path / "ca", TD, now=datetime.now(UTC))
    result = subprocess.run(
        [sys.executable, "-m", "meshd", "ca", "rotate", "--dir", str(tmp_path / "ca"),
         "--spread", "5s"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--timeout and --spread go with --finish" in result.stderr
    assert store.load_ca(tmp_path / "ca").previous is None  # nothing rotated
