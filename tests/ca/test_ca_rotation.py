"""Root rotation: a new root certified by the old one, chains OpenSSL accepts whichever root a
peer trusts, the CA API following a rotation made by another process, and `--finish` refusing
while a live certificate still depends on the previous root."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from cryptography import x509
from test_ca_renew import connection, joined, store_result

from meshd.ca import audit, issuer, operations, store
from meshd.ca.server import CAEndpoint
from meshd.ca.store import CADatabase, CAMaterial
from meshd.errors import CAError
from meshd.identity import ca_client as client
from meshd.identity import files, keys
from meshd.identity.certs import Identity
from meshd.identity.spiffe import Kind

TD = "mesh.test"


def leaf(material: CAMaterial, directory: Path, service: str) -> Identity:
    key = keys.new_private_key()
    cert = issuer.issue_leaf(material.signer, key.public_key(), service=service,
                             trust_domain=TD, now=datetime.now(UTC))
    identity = Identity.from_pem(issuer.chain_pem(cert, material.signer),
                                 keys.private_key_pem(key))
    files.write_identity(directory, identity)
    return identity


def context(side: ssl.Purpose, directory: Path, service: str,
            roots: list[x509.Certificate]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(side, cadata="".join(keys.cert_pem(r).decode()
                                                          for r in roots))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(directory / f"{service}.crt", directory / f"{service}.key")
    return ctx


async def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> None:
    """A TLS 1.3 handshake over memory streams; raises BrokenResourceError if either side
    refuses (the other side is then cut off, not left waiting)."""
    left, right = trio.testing.memory_stream_pair()
    a = trio.SSLStream(left, client_ctx, server_hostname="x")
    b = trio.SSLStream(right, server_ctx, server_side=True)
    failed: list[BaseException] = []

    async def run(stream: Any, peer: trio.abc.AsyncResource) -> None:
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failed.append(exc)
            await trio.aclose_forcefully(peer)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, a, right)
            nursery.start_soon(run, b, left)
    if failed:
        raise trio.BrokenResourceError("handshake refused") from failed[0]


async def test_new_root_leaves_verify_for_peers_trusting_either_root(tmp_path: Path) -> None:
    old = store.init_ca(tmp_path / "ca", TD, now=datetime.now(UTC))
    old_leaf = leaf(old, tmp_path / "old", "web")
    new = operations.rotate_ca(tmp_path / "ca", now=datetime.now(UTC))
    assert new.previous_fingerprint == old.fingerprint != new.fingerprint
    assert [keys.fingerprint(r) for r in new.roots()] == [new.fingerprint, old.fingerprint]
    (cross,) = new.signer.chain
    assert cross.subject == cross.issuer == old.signer.cert.subject  # self-issued
    new_leaf = leaf(new, tmp_path / "new", "payments")
    leaf(new, tmp_path / "new", "cart")
    assert len(x509.load_pem_x509_certificates(new_leaf.cert_pem)) == 2  # leaf + cross

    only_old, only_new = [old.signer.cert], [new.signer.cert]
    both = new.roots()
    for trusted in (only_old, only_new, both):
        # new-root leaves (served with the cross certificate) are accepted, as servers and as
        # clients, by peers trusting the old root only, the new root only, or both
        await handshake(context(ssl.Purpose.SERVER_AUTH, tmp_path / "new", "cart", trusted),
                        context(ssl.Purpose.CLIENT_AUTH, tmp_path / "new", "payments", trusted))
    # during the rotation, old-root and new-root leaves meet (the bundles hold both roots, or
    # the old one only, on hosts that have not seen the new bundle yet)
    for trusted in (only_old, both):
        await handshake(context(ssl.Purpose.SERVER_AUTH, tmp_path / "old", "web", trusted),
                        context(ssl.Purpose.CLIENT_AUTH, tmp_path / "new", "payments", both))
    # an old-root leaf needs the old root: this is why the bundle keeps it during the rotation
    with pytest.raises(trio.BrokenResourceError):
        await handshake(context(ssl.Purpose.SERVER_AUTH, tmp_path / "new", "payments", only_new),
                        context(ssl.Purpose.CLIENT_AUTH, tmp_path / "old", "web", both))
    assert old_leaf.serial != new_leaf.serial


def test_rotate_then_finish_only_once_nothing_depends_on_the_old_root(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    now = datetime.now(UTC)
    first = store.init_ca(d, TD, now=now)
    with pytest.raises(CAError, match="no root rotation is in progress"):
        operations.finish_rotation(d, now=now)
    _, _, cert, _ = operations.issue_offline(d, Kind.OPERATOR, "alice", now=now,
                                        lifetime=timedelta(hours=2), who="test")
    rotated = operations.rotate_ca(d, now=now, who="test")
    assert not (d / "root.key").exists()  # the old key signs nothing any more
    assert (d / "root.crt").exists() and (d / "root-2.key").exists()
    for private in ("root-2.key", "state.json", "audit.log", "ca.lock"):
        assert (d / private).stat().st_mode & 0o777 == 0o600, private
    assert d.stat().st_mode & 0o777 == 0o700
    with pytest.raises(CAError, match="already in progress"):
        operations.rotate_ca(d, now=now)
    assert store.load_ca(d).previous_fingerprint == first.fingerprint  # survives a reload

    with pytest.raises(CAError) as info:
        operations.finish_rotation(d, now=now, who="test")
    reason = str(info.value)
    assert "1 live certificate(s) still depend on the previous root" in reason
    assert f"spiffe://{TD}/operator/alice (serial {keys.serial_hex(cert)}" in reason
    assert "revoke them" in reason
    # two hours later it has expired: nothing depends on the old root any more
    finished = operations.finish_rotation(d, now=now + timedelta(hours=3), who="test")
    assert finished.fingerprint == rotated.fingerprint and finished.previous is None
    assert finished.signer.chain == ()
    assert not (d / "root.crt").exists() and not list(d.glob("cross-*"))
    actions = [r["action"] for r in audit.read(d)]
    assert actions == ["init", "issue", "rotate", "rotate_finish_refused", "rotate_finish"]
    # and a second rotation works the same way
    third = operations.rotate_ca(d, now=now + timedelta(hours=3))
    assert third.files.root == "root-3" and third.previous_fingerprint == rotated.fingerprint


async def test_the_api_follows_a_rotation_made_by_another_process(
    ca: CAMaterial, ca_server: CAEndpoint, tmp_path: Path
) -> None:
    first = await joined(ca_server, ca, tmp_path, services=("web",))
    rotated = operations.rotate_ca(ca.directory, now=datetime.now(UTC))

    async def both_roots() -> bool:
        bundle = await client.fetch_roots(ca_server.url, ca.fingerprint)
        return set(bundle.fingerprints()) == {ca.fingerprint, rotated.fingerprint}
    with trio.fail_after(5):
        while not await both_roots():  # noqa: ASYNC110 - the server reloads within a second
            await trio.sleep(0.1)

    # finishing is refused: the node's certificates come from the old root
    with pytest.raises(CAError, match="node n1"):
        operations.finish_rotation(ca.directory, now=datetime.now(UTC))

    # renewing (authenticated by the old-root node certificate, over TLS verified against the
    # old root only: the API's certificate chains to it through the cross certificate)
    conn = connection(ca_server, tmp_path)
    second = await conn.renew("n1", ["web"])
    assert keys.verify_issued_by(second.identities["web"].certificate(), [rotated.signer.cert])
    assert len(x509.load_pem_x509_certificates(second.identities["web"].cert_pem)) == 2
    store_result(tmp_path, second)
    # still refused: the node has not shown it moved to the new certificates yet
    with pytest.raises(CAError, match="still depend on the previous root"):
        operations.finish_rotation(ca.directory, now=datetime.now(UTC))
    # polling with the new node certificate confirms that batch
    await conn.reload(files.node_files(tmp_path))
    await conn.denylist()
    await conn.aclose()
    assert CADatabase(ca.directory).ledger().nodes["n1"].confirmed_batch == 2
    done = operations.finish_rotation(ca.directory, now=datetime.now(UTC))
    assert done.roots() == [rotated.signer.cert]

    async def new_root_only() -> bool:
        verify = ssl.create_default_context(cafile=tmp_path / "ca.crt")
        async with httpx.AsyncClient(verify=verify) as http:
            body = (await http.get(f"{ca_server.url}/v1/ca/roots")).json()
        return len(body["roots"]) == 1
    with trio.fail_after(5):
        while not await new_root_only():  # noqa: ASYNC110
            await trio.sleep(0.1)
    # the pin printed by `ca init` no longer matches: new joins need the new fingerprint
    with pytest.raises(CAError, match="not the pinned CA"):
        await client.fetch_roots(ca_server.url, ca.fingerprint)
    assert first.node.serial != second.node.serial
