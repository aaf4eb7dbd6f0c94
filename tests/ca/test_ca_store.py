"""The CA directory (init/load), join tokens (pure decisions and the shared store), and the
identity files a host keeps."""

from __future__ import annotations

import json
import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from meshd.ca import issuer, tokens
from meshd.ca.store import TokenStore, init_ca, load_ca
from meshd.errors import CAError
from meshd.identity import keys
from meshd.identity.certs import Identity, TrustBundle
from meshd.identity.files import read_bundle, read_identity, write_bundle, write_identity

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- init / load ------------------------------------------------------------------------------

def test_init_writes_a_private_ca(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    material = init_ca(d, "mesh.test", now=NOW)
    assert mode(d) == 0o700
    assert mode(d / "root.key") == 0o600
    assert (d / "root.crt").read_bytes() == keys.cert_pem(material.signer.cert)
    settings = json.loads((d / "ca.json").read_text())
    assert settings["trust_domain"] == "mesh.test"
    assert settings["leaf_lifetime_seconds"] == 24 * 3600
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", material.fingerprint)
    assert settings["root_fingerprint"] == material.fingerprint
    assert not list(d.glob(".*.tmp"))  # no temporary files left behind

    loaded = load_ca(d)
    assert loaded.fingerprint == material.fingerprint
    assert loaded.settings == material.settings


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    first = init_ca(d, "mesh.test", now=NOW)
    store = TokenStore(d)
    token, _ = store.mint("n1", ["web"], now=NOW, ttl=timedelta(hours=1))
    with pytest.raises(CAError, match="--force"):
        init_ca(d, "mesh.test", now=NOW)
    assert load_ca(d).fingerprint == first.fingerprint

    second = init_ca(d, "other.test", now=NOW, force=True)
    assert second.fingerprint != first.fingerprint
    assert load_ca(d).trust_domain == "other.test"
    # tokens minted for the old root are gone
    _, refusal = store.redeem(token, node="n1", services=["web"], now=NOW)
    assert refusal is not None and refusal.code == "invalid_token"


def test_init_tightens_an_existing_directory(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    d.mkdir(mode=0o755)
    init_ca(d, "mesh.test", now=NOW)
    assert mode(d) == 0o700


def test_init_rejects_a_bad_trust_domain(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="trust domain"):
        init_ca(tmp_path / "ca", "Not A Domain", now=NOW)


def test_load_refuses_missing_or_exposed_ca(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="meshd ca init"):
        load_ca(tmp_path / "nothing")
    d = tmp_path / "ca"
    init_ca(d, "mesh.test", now=NOW)
    (d / "root.key").chmod(0o644)
    with pytest.raises(CAError, match="chmod 600"):
        load_ca(d)


# --- tokens: the pure decision ----------------------------------------------------------------

def test_token_decisions_in_order() -> None:
    token, record = tokens.mint("n1", ["web", "cart"], now=NOW, ttl=timedelta(hours=1), uses=1)
    assert re.fullmatch(r"[0-9a-f]{8}\.[A-Za-z0-9_-]{43}", token)
    assert token.split(".")[1] not in repr(record)  # only the hash is kept

    def admit(tok: str = token, rec: tokens.JoinToken | None = record, node: str = "n1",
              services: tuple[str, ...] = ("web",), now: datetime = NOW) -> str | None:
        refusal = tokens.admit(rec, tok, node=node, services=services, now=now)
        return None if refusal is None else f"{refusal.status} {refusal.code}"

    assert admit() is None
    assert admit(services=("web", "cart")) is None
    assert admit(rec=None) == "401 invalid_token"
    assert admit(tok=token[:-1] + ("A" if token[-1] != "A" else "B")) == "401 invalid_token"
    assert admit(tok="garbage") == "401 invalid_token"
    assert admit(now=NOW + timedelta(hours=1)) == "401 token_expired"
    assert admit(rec=tokens.consume(record)) == "401 token_used_up"
    assert admit(node="n2") == "403 node_not_allowed"
    refusal = tokens.admit(record, token, node="n1", services=["web", "billing"], now=NOW)
    assert refusal is not None and refusal.status == 403 and "'billing'" in refusal.reason
    # expiry is checked before the node: an expired token says so to anyone
    assert admit(node="n2", now=NOW + timedelta(days=1)) == "401 token_expired"


def test_token_json_round_trip() -> None:
    _, record = tokens.mint("n1", ["web"], now=NOW, ttl=timedelta(minutes=10), uses=3)
    assert tokens.from_json(record.token_id, tokens.to_json(record)) == record
    _, unlimited = tokens.mint("n1", ["web"], now=NOW, ttl=timedelta(minutes=10), uses=None)
    assert tokens.consume(unlimited) == unlimited
    _, default = tokens.mint("n1", ["web"], now=NOW, ttl=timedelta(minutes=10))
    assert default.uses_left == 1  # single use unless asked otherwise


@pytest.mark.parametrize(
    ("node", "services", "ttl", "uses"),
    [("", ["web"], 60, None), ("n1", [], 60, None), ("n1", ["a/b"], 60, None),
     ("n1", ["web"], 0, None), ("n1", ["web"], 60, 0)],
)
def test_mint_rejects_bad_arguments(
    node: str, services: list[str], ttl: int, uses: int | None
) -> None:
    with pytest.raises(ValueError):
        tokens.mint(node, services, now=NOW, ttl=timedelta(seconds=ttl), uses=uses)


# --- tokens: the shared store -----------------------------------------------------------------

def test_store_counts_uses_and_keeps_only_hashes(tmp_path: Path) -> None:
    init_ca(tmp_path, "mesh.test", now=NOW)
    store = TokenStore(tmp_path)
    token, _ = store.mint("n1", ["web"], now=NOW, ttl=timedelta(hours=1), uses=2)
    assert mode(tmp_path / "tokens.json") == 0o600
    assert token.split(".")[1] not in (tmp_path / "tokens.json").read_text()

    def redeem(node: str = "n1") -> str | None:
        _, refusal = store.redeem(token, node=node, services=["web"], now=NOW)
        return refusal.code if refusal else None

    assert redeem(node="n2") == "node_not_allowed"  # refusals do not count
    assert redeem() is None
    assert redeem() is None
    assert redeem() == "token_used_up"
    # a second store (another process) sees the same count
    _, refusal = TokenStore(tmp_path).redeem(token, node="n1", services=["web"], now=NOW)
    assert refusal is not None and refusal.code == "token_used_up"


async def test_concurrent_redemptions_never_exceed_the_uses(tmp_path: Path) -> None:
    init_ca(tmp_path, "mesh.test", now=NOW)
    token, _ = TokenStore(tmp_path).mint("n1", ["web"], now=NOW, ttl=timedelta(hours=1), uses=5)
    admitted = 0

    async def one() -> None:
        nonlocal admitted
        store = TokenStore(tmp_path)
        _, refusal = await trio.to_thread.run_sync(
            lambda: store.redeem(token, node="n1", services=["web"], now=NOW)
        )
        admitted += refusal is None

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert admitted == 5


def test_store_forgets_long_expired_tokens(tmp_path: Path) -> None:
    init_ca(tmp_path, "mesh.test", now=NOW)
    store = TokenStore(tmp_path)
    old, _ = store.mint("n1", ["web"], now=NOW, ttl=timedelta(hours=1))
    store.mint("n2", ["web"], now=NOW + timedelta(days=30), ttl=timedelta(hours=1))
    assert len(json.loads((tmp_path / "tokens.json").read_text())["tokens"]) == 1
    _, refusal = store.redeem(old, node="n1", services=["web"], now=NOW + timedelta(days=30))
    assert refusal is not None and refusal.code == "invalid_token"


def test_corrupt_token_file_is_a_ca_error(tmp_path: Path) -> None:
    init_ca(tmp_path, "mesh.test", now=NOW)
    (tmp_path / "tokens.json").write_text("{not json")
    with pytest.raises(CAError, match="corrupt"):
        TokenStore(tmp_path).mint("n1", ["web"], now=NOW, ttl=timedelta(hours=1))


# --- identity files -------------------------------------------------------------------------

def _identity(service: str) -> tuple[Identity, TrustBundle]:
    root_key = keys.new_private_key()
    signer = issuer.Signer(root_key, issuer.build_root(root_key, "mesh.test", NOW))
    key = keys.new_private_key()
    cert = issuer.issue_leaf(signer, key.public_key(), service=service, trust_domain="mesh.test",
                             now=NOW)
    bundle = TrustBundle.from_pems("mesh.test", [keys.cert_pem(signer.cert)])
    return Identity.from_pem(keys.cert_pem(cert), keys.private_key_pem(key)), bundle


def test_identity_files_round_trip(tmp_path: Path) -> None:
    identity, bundle = _identity("web")
    d = tmp_path / "certs"
    write_identity(d, identity)
    write_bundle(d, bundle)
    assert mode(d) == 0o700
    assert mode(d / "web.key") == 0o600
    assert read_identity(d, "web") == identity
    assert read_bundle(d, "mesh.test") == bundle
    assert identity.spiffe_id == "spiffe://mesh.test/svc/web"
    assert identity.not_after - identity.not_before == timedelta(hours=24, minutes=1)
    assert "PRIVATE KEY" not in repr(identity)


def test_read_identity_refuses_mismatches(tmp_path: Path) -> None:
    web, _ = _identity("web")
    cart, _ = _identity("cart")
    write_identity(tmp_path, web)
    write_identity(tmp_path, cart)
    with pytest.raises(CAError, match="No such file"):
        read_identity(tmp_path, "billing")
    # a key that does not belong to the certificate (e.g. caught mid-update)
    (tmp_path / "web.key").write_bytes(cart.key_pem)
    with pytest.raises(CAError, match="does not match"):
        read_identity(tmp_path, "web")
    # a certificate filed under the wrong name
    (tmp_path / "cart.crt").rename(tmp_path / "other.crt")
    (tmp_path / "cart.key").rename(tmp_path / "other.key")
    with pytest.raises(CAError, match="not of 'other'"):
        read_identity(tmp_path, "other")


# --- the ledger on disk: state and the certificate journal ------------------------------------

def test_certificates_are_appended_and_compacted_once_mostly_expired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshd.ca import journal, ledger, store
    from meshd.ca.ledger import IssuedRecord
    from meshd.identity.spiffe import Kind

    monkeypatch.setattr(journal, "COMPACT_SLACK", 4)
    init_ca(tmp_path, "mesh.test", now=NOW)
    writer, reader = store.CADatabase(tmp_path), store.CADatabase(tmp_path)
    real_now = datetime.now(UTC)

    def record(i: int, expired: bool) -> IssuedRecord:
        not_after = real_now + (timedelta(hours=-1) if expired else timedelta(hours=1))
        return IssuedRecord(format(0x1000 + i, "x"), Kind.SERVICE, "web", "n1", "sha256:x",
                            real_now, not_after)

    for i in range(12):  # 12 expired
        with writer.transaction() as txn:
            ledger.record_issued(txn.ledger, record(i, expired=True))
        if i < 3:  # before the first compaction check: read incrementally, line by line
            assert len(reader.ledger().issued) == i + 1
    journal_file = tmp_path / "issued.jsonl"
    assert mode(journal_file) == 0o600
    for i in range(12, 15):  # then live ones
        with writer.transaction() as txn:
            ledger.record_issued(txn.ledger, record(i, expired=False))
    lines = journal_file.read_text().splitlines()
    assert len(lines) < 15  # compacted along the way
    live = {format(0x1000 + i, "x") for i in range(12, 15)}
    # a reader that had read part of the old file reads the new one whole
    assert live <= set(reader.ledger().issued)
    assert live <= set(store.read_ledger(tmp_path).issued)
    assert json.loads(lines[-1])["serial"] == format(0x1000 + 14, "x")
