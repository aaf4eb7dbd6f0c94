"""The operator's commands on the CA directory: offline issuance (``meshd ca issue``),
revocation (``meshd ca revoke``) and root rotation (``meshd ca rotate [--finish]``). Each runs
under the CA's lock, records what it did in the ledger and the audit log, and raises CAError
with the reason when it refuses. Blocking.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from meshd import timestamps
from meshd.ca import audit, issuer, ledger
from meshd.ca.ledger import IssuedRecord
from meshd.ca.store import (
    SETTINGS,
    CADatabase,
    CAMaterial,
    RootFiles,
    load_ca,
    locked,
    read_ledger,
    settings_json,
)
from meshd.errors import CAError
from meshd.identity import keys
from meshd.identity.files import (
    BUNDLE_FILE,
    ensure_private_dir,
    write_private_file,
    write_public_file,
)
from meshd.identity.spiffe import Kind, check_name, spiffe_id_of

log = logging.getLogger(__name__)


def issue_offline(
    directory: str | os.PathLike[str], kind: Kind, name: str, *, now: datetime,
    lifetime: timedelta | None = None, who: str = "",
) -> tuple[CAMaterial, bytes, x509.Certificate, bytes]:
    """Issue a certificate without a node (``meshd ca issue``): returns the CA, the new key
    (PEM), the certificate and its chain PEM. Recorded in the ledger and the audit log."""
    try:
        check_name(name, "service" if kind is Kind.SERVICE else kind.value)
    except ValueError as exc:
        raise CAError(str(exc)) from None
    load_ca(directory)  # a clear error when there is no CA here
    db = CADatabase(directory)
    key = keys.new_private_key()
    with db.transaction() as txn:
        material = load_ca(directory)
        try:
            cert = issuer.issue_identity(
                material.signer, key.public_key(), kind=kind, name=name,
                trust_domain=material.trust_domain, now=now,
                lifetime=lifetime or material.settings.leaf_lifetime)
        except ValueError as exc:
            raise CAError(str(exc)) from None
        record = IssuedRecord(keys.serial_hex(cert), kind, name, None, material.fingerprint,
                              now, cert.not_valid_after_utc)
        ledger.prune(txn.ledger, now)
        ledger.record_issued(txn.ledger, record)
        txn.audit.append(audit.event(
            "issue", now=now, who=who or audit.operator(),
            what=spiffe_id_of(material.trust_domain, kind, name), serial=record.serial,
            not_after=record.not_after, root=record.root))
    return material, keys.private_key_pem(key), cert, issuer.chain_pem(cert, material.signer)


@dataclass(frozen=True)
class IssuedFiles:
    """Where ``issue_to_directory`` wrote a certificate, its key and the CA bundle."""

    cert: Path
    key: Path
    ca_bundle: Path
    certificate: x509.Certificate
    trust_domain: str


def issue_to_directory(
    directory: str | os.PathLike[str], kind: Kind, name: str, out: str | os.PathLike[str], *,
    now: datetime, lifetime: timedelta | None = None,
) -> IssuedFiles:
    """``meshd ca issue``: issue offline and write NAME.key (0600, in a 0700 directory),
    NAME.crt (the chain) and ca.crt (the roots) into ``out``."""
    material, key_pem, cert, chain = issue_offline(directory, kind, name, now=now,
                                                   lifetime=lifetime)
    try:
        target = ensure_private_dir(out)
        files = IssuedFiles(target / f"{name}.crt", target / f"{name}.key",
                            target / BUNDLE_FILE, cert, material.trust_domain)
        write_private_file(files.key, key_pem)
        write_public_file(files.cert, chain)
        write_public_file(files.ca_bundle,
                          b"".join(keys.cert_pem(c) for c in material.roots()))
    except OSError as exc:
        raise CAError(f"cannot write to {out}: {exc}") from exc
    return files


def revoke(
    directory: str | os.PathLike[str], *, now: datetime, node: str | None = None,
    serial: str | None = None, who: str = "",
) -> list[ledger.Revocation]:
    """Revoke a node (every live certificate of it, and its renewals) or one serial. Raises
    CAError for an unknown node or serial."""
    who = who or audit.operator()
    with CADatabase(directory).transaction() as txn:
        ledger.prune(txn.ledger, now)
        if node is not None:
            if node not in txn.ledger.nodes:
                raise CAError(f"no node {node!r} has joined this CA")
            done = ledger.revoke_node(txn.ledger, node, now)
            txn.audit.append(audit.event("revoke", now=now, who=who, what=f"node/{node}",
                                         serials=[r.serial for r in done]))
        elif serial is not None:
            try:
                done = [ledger.revoke_serial(txn.ledger, serial, now)]
            except ValueError:
                raise CAError(f"{serial!r} is not a hexadecimal serial number") from None
            except KeyError:
                raise CAError(f"no live certificate with serial {serial} was issued by this CA "
                              "(unknown, or already expired)") from None
        else:
            raise CAError("revoke needs a node or a serial")
        for r in done:
            issued = txn.ledger.issued.get(r.serial)
            txn.audit.append(audit.event(
                "revoke", now=now, who=who, what=issued.what if issued else "",
                node=issued.node if issued else None, serial=r.serial, not_after=r.not_after,
                reason=r.reason))
    return done


def rotate_ca(directory: str | os.PathLike[str], *, now: datetime, who: str = "") -> CAMaterial:
    """Start a root rotation: a new root signs from now on, certified by the old one; both are in
    the bundle until ``finish_rotation``. Raises CAError while a rotation is in progress."""
    d = Path(directory)
    who = who or audit.operator()
    try:
        with locked(d):
            old = load_ca(d)
            if old.previous is not None:
                raise CAError("a root rotation is already in progress; finish it first "
                              "(`meshd ca rotate --finish`)")
            generation = old.files.generation + 1
            key = keys.new_private_key()
            root = issuer.build_root(key, old.trust_domain, now)
            try:
                cross = issuer.cross_sign(old.signer, root, now)
            except ValueError as exc:
                raise CAError(str(exc)) from None
            files = RootFiles(root=f"root-{generation}", generation=generation,
                              previous_root=old.files.root, cross_cert=f"cross-{generation}.crt")
            write_private_file(d / f"{files.root}.key", keys.private_key_pem(key))
            write_public_file(d / f"{files.root}.crt", keys.cert_pem(root))
            write_public_file(d / str(files.cross_cert), keys.cert_pem(cross))
            write_public_file(d / SETTINGS, settings_json(old.settings, files, root, now))
            # The old key signs nothing any more: the cross certificate was its last signature.
            (d / f"{old.files.root}.key").unlink(missing_ok=True)
            audit.append(d, [audit.event(
                "rotate", now=now, who=who, what=old.trust_domain, root=keys.fingerprint(root),
                previous_root=old.fingerprint, serial=keys.serial_hex(cross))])
    except OSError as exc:
        raise CAError(f"cannot rotate the root in {d}: {exc}") from exc
    material = load_ca(d)
    log.info("root rotation started: new root %s, previous %s", material.fingerprint,
             old.fingerprint)
    return material


def finish_rotation(
    directory: str | os.PathLike[str], *, now: datetime, who: str = "",
) -> CAMaterial:
    """Drop the previous root. Refuses (CAError with the reason) while a certificate that may
    still be presented depends on it (``ledger.depending_on_root``)."""
    d = Path(directory)
    who = who or audit.operator()
    try:
        with locked(d):
            material = load_ca(d)
            previous = material.previous_fingerprint
            if previous is None or material.files.previous_root is None:
                raise CAError("no root rotation is in progress")
            state = read_ledger(d)
            depending = ledger.depending_on_root(state, previous, now)
            if depending:
                reason = depending_reason(depending, material.trust_domain)
                audit.append(d, [audit.event("rotate_finish_refused", now=now, who=who,
                                             root=previous, reason=reason)])
                raise CAError(reason)
            files = replace(material.files, previous_root=None, cross_cert=None)
            write_public_file(d / SETTINGS,
                              settings_json(material.settings, files, material.signer.cert, now))
            (d / f"{material.files.previous_root}.crt").unlink(missing_ok=True)
            if material.files.cross_cert:
                (d / material.files.cross_cert).unlink(missing_ok=True)
            audit.append(d, [audit.event("rotate_finish", now=now, who=who,
                                         root=material.fingerprint, previous_root=previous)])
    except OSError as exc:
        raise CAError(f"cannot finish the rotation in {d}: {exc}") from exc
    return load_ca(d)


def depending_reason(depending: list[IssuedRecord], trust_domain: str, shown: int = 5) -> str:
    """Why the previous root cannot go yet, naming the certificates (pure)."""
    names = [
        f"{spiffe_id_of(trust_domain, r.kind, r.name)} (serial {r.serial}"
        + (f", node {r.node}" if r.node else "")
        + f", expires {timestamps.format_time(r.not_after)})"
        for r in depending[:shown]
    ]
    more = f" and {len(depending) - shown} more" if len(depending) > shown else ""
    last = max(r.not_after for r in depending)
    offline = [r.serial for r in depending if r.node is None]
    steps = (f" Certificates issued offline ({', '.join(offline[:shown])}) are not renewed by "
             "any node: issue a replacement from the new root (`meshd ca issue`), put it to use "
             "(an operator certificate: sign the route table with it again, `meshd routes "
             "apply`), then `meshd ca revoke --serial SERIAL` the old one." if offline else "")
    return (f"{len(depending)} live certificate(s) still depend on the previous root: "
            f"{'; '.join(names)}{more}. Nodes move to the new root at their next renewal "
            "(`meshd ca rotate --finish` asks them to renew now);" + steps
            + f" Otherwise wait until {timestamps.format_time(last)} or revoke them")


def ask_renewal(
    directory: str | os.PathLike[str], *, now: datetime, root: str | None, spread: timedelta,
    who: str = "",
) -> ledger.RenewalRequest:
    """Ask every node whose node certificate was issued before ``now`` (by ``root``, when given)
    to renew at its next deny-list poll, each within ``spread``. Kept in the CA's state (it
    applies to nodes that are down until they come back; a later request replaces it) and
    audited."""
    request = ledger.RenewalRequest(before=now, root=root,
                                    spread_seconds=spread.total_seconds(), requested_at=now,
                                    who=who or audit.operator())
    with CADatabase(directory).transaction() as txn:
        txn.ledger.renewal = request
        txn.audit.append(audit.event(
            "renew_requested", now=now, who=request.who, what="nodes", root=root,
            issued_before=now, spread_seconds=request.spread_seconds))
    return request


@dataclass(frozen=True)
class RotationProgress:
    """Where a root rotation stands: the nodes with a live certificate (``nodes``), those
    still depending on the previous root (``waiting``), and the certificates issued offline
    that do (no node renews them: reissue and revoke them, or wait for their expiry)."""

    nodes: tuple[str, ...]
    waiting: tuple[str, ...]
    offline: tuple[IssuedRecord, ...]

    def summary(self) -> str:
        done = len(self.nodes) - len(self.waiting)
        shown = ", ".join(self.waiting[:10]) + (" ..." if len(self.waiting) > 10 else "")
        return (f"{done}/{len(self.nodes)} node(s) on the new root"
                + (f"; waiting for {shown}" if self.waiting else ""))


def rotation_progress(directory: str | os.PathLike[str], *, now: datetime) -> RotationProgress:
    """Raises CAError when no rotation is in progress."""
    material = load_ca(directory)
    previous = material.previous_fingerprint
    if previous is None:
        raise CAError("no root rotation is in progress")
    state = read_ledger(directory)
    live = {r.node for r in state.issued.values()
            if r.node is not None and r.not_after > now and r.serial not in state.revoked}
    nodes = tuple(sorted(n for n in live
                         if n in state.nodes and state.nodes[n].revoked_at is None))
    depending = ledger.depending_on_root(state, previous, now)
    waiting = tuple(sorted({r.node for r in depending if r.node is not None} & set(nodes)))
    return RotationProgress(nodes, waiting, tuple(r for r in depending if r.node is None))
