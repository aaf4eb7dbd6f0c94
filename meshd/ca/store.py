"""The CA directory: roots, settings, join tokens, the ledger, the audit log.

Layout (directory 0700)::

    root.key       the signing root's key: ECDSA P-256, PKCS#8 PEM, 0600 (root-N.key after the
    root.crt       N-1th rotation) and its self-signed certificate
    root-M.crt     during a rotation only: the previous root, still trusted (its key is gone)
    cross-N.crt    during a rotation only: the new root certified by the previous one
    ca.json        {"version": 1, "trust_domain": ..., "leaf_lifetime_seconds": ..., "root": ...,
                    "previous_root": ..., "cross_cert": ..., ...}: the commit point of a rotation
    tokens.json    join-token records (hashes only), 0600
    state.json     the ledger's nodes and revocations, 0600
    issued.jsonl   the ledger's certificates, one JSON line each, 0600: appended to (a renewal
                   costs its own lines, not a rewrite of the fleet's), compacted (expired lines
                   dropped, atomic replace) when more than half of it has expired
    audit.log      JSON lines, 0600, append-only
    ca.lock        flock(2) taken around every read-modify-write of tokens/state and rotations

``meshd ca token|revoke|rotate|issue`` and ``meshd ca serve`` run at the same time as separate
processes, so nothing mutable is cached across a transaction: each one locks, reads, decides,
writes atomically and unlocks. Readers that do not change anything (the server answering the
deny list) read without the lock: every file is replaced atomically. All functions here block
(disk, flock); the server calls them through ``trio.to_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from meshd import timestamps
from meshd.ca import audit, issuer, ledger, tokens
from meshd.ca.journal import IssuedJournal
from meshd.ca.ledger import IssuedRecord, Ledger
from meshd.ca.tokens import JoinToken, Refusal
from meshd.errors import CAError
from meshd.identity import keys
from meshd.identity.files import ensure_private_dir, write_private_file, write_public_file
from meshd.identity.spiffe import check_trust_domain

log = logging.getLogger(__name__)

INITIAL_ROOT = "root"
ROOT_KEY = "root.key"
ROOT_CERT = "root.crt"
SETTINGS = "ca.json"
TOKENS = "tokens.json"
STATE = "state.json"
ISSUED = "issued.jsonl"
LOCK = "ca.lock"
FORMAT_VERSION = 1
# Expired or used-up token records are kept this long so a late join hears why it is refused.
KEEP_SPENT_TOKENS = timedelta(days=7)


@dataclass(frozen=True)
class CAStoreSettings:
    """What ``ca.json`` records about the CA (not a host's ``[ca]`` table: that is
    ``meshd.config.schema.CASettings``)."""

    trust_domain: str
    leaf_lifetime: timedelta = issuer.DEFAULT_LEAF_LIFETIME


@dataclass(frozen=True)
class RootFiles:
    """Which files hold the roots: ``ca.json``'s part of the story."""

    root: str = INITIAL_ROOT         # <root>.key and <root>.crt: the signing root
    generation: int = 1
    previous_root: str | None = None  # <previous_root>.crt: trusted until the rotation ends
    cross_cert: str | None = None     # the signing root certified by the previous one


@dataclass(frozen=True)
class CAMaterial:
    """A loaded CA: its settings, the signer (root key + certificate, and during a rotation the
    cross certificate served after each leaf) and the previous root, while it is trusted."""

    directory: Path
    settings: CAStoreSettings
    signer: issuer.Signer
    previous: x509.Certificate | None = None
    files: RootFiles = field(default_factory=RootFiles)

    @property
    def trust_domain(self) -> str:
        return self.settings.trust_domain

    @property
    def fingerprint(self) -> str:
        return keys.fingerprint(self.signer.cert)

    @property
    def previous_fingerprint(self) -> str | None:
        return keys.fingerprint(self.previous) if self.previous is not None else None

    def roots(self) -> list[x509.Certificate]:
        """The trust bundle: the signing root, and during a rotation the previous one."""
        return [self.signer.cert] + ([self.previous] if self.previous is not None else [])


def init_ca(
    directory: str | os.PathLike[str],
    trust_domain: str,
    *,
    now: datetime,
    leaf_lifetime: timedelta = issuer.DEFAULT_LEAF_LIFETIME,
    force: bool = False,
    who: str = "",
) -> CAMaterial:
    """Create a new root in ``directory``. Refuses to replace an existing CA unless ``force``
    (which also forgets its join tokens and ledger: they belong to the old root). Raises
    CAError."""
    try:
        check_trust_domain(trust_domain)
    except ValueError as exc:
        raise CAError(str(exc)) from None
    if leaf_lifetime <= timedelta(0):
        raise CAError("leaf lifetime must be positive")
    d = Path(directory)
    existing = [name for name in (ROOT_KEY, ROOT_CERT, SETTINGS) if (d / name).exists()]
    if existing and not force:
        raise CAError(
            f"{d} already holds a CA ({', '.join(existing)}); pass --force to replace it"
        )
    key = keys.new_private_key()
    root = issuer.build_root(key, trust_domain, now)
    settings = CAStoreSettings(trust_domain, leaf_lifetime)
    files = RootFiles()
    try:
        ensure_private_dir(d)
        with locked(d):
            (d / TOKENS).unlink(missing_ok=True)
            (d / STATE).unlink(missing_ok=True)
            (d / ISSUED).unlink(missing_ok=True)
            for stale in [*d.glob("root-*.key"), *d.glob("root-*.crt"), *d.glob("cross-*.crt")]:
                stale.unlink()
            write_private_file(d / ROOT_KEY, keys.private_key_pem(key))
            write_public_file(d / ROOT_CERT, keys.cert_pem(root))
            write_public_file(d / SETTINGS, settings_json(settings, files, root, now))
            audit.append(d, [audit.event("init", now=now, who=who or audit.operator(),
                                         what=trust_domain, root=keys.fingerprint(root))])
    except OSError as exc:
        raise CAError(f"cannot initialise CA in {d}: {exc}") from exc
    return CAMaterial(d, settings, issuer.Signer(key, root), files=files)


def load_ca(directory: str | os.PathLike[str]) -> CAMaterial:
    """Load the CA in ``directory``. Raises CAError if it is missing, inconsistent, or its key is
    readable by others."""
    d = Path(directory)
    try:
        raw = json.loads((d / SETTINGS).read_text())
        settings = CAStoreSettings(
            trust_domain=check_trust_domain(str(raw["trust_domain"])),
            leaf_lifetime=timedelta(seconds=int(raw["leaf_lifetime_seconds"])),
        )
        files = RootFiles(
            root=str(raw.get("root", INITIAL_ROOT)),
            generation=int(raw.get("root_generation", 1)),
            previous_root=raw.get("previous_root"),
            cross_cert=raw.get("cross_cert"),
        )
        key_path = d / f"{files.root}.key"
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise CAError(
                f"{key_path} is accessible by group or others (mode {mode:04o}); chmod 600 it"
            )
        key = keys.load_private_key_pem(key_path.read_bytes())
        root = x509.load_pem_x509_certificate((d / f"{files.root}.crt").read_bytes())
        previous = chain = None
        if files.previous_root and files.cross_cert:
            previous = x509.load_pem_x509_certificate(
                (d / f"{files.previous_root}.crt").read_bytes())
            chain = x509.load_pem_x509_certificate((d / files.cross_cert).read_bytes())
    except FileNotFoundError as exc:
        raise CAError(f"no CA in {d} ({exc.filename} missing); run `meshd ca init` first") from exc
    except OSError as exc:
        raise CAError(f"cannot read CA in {d}: {exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise CAError(f"corrupt CA in {d}: {exc}") from exc
    if not keys.same_public_key(key.public_key(), root.public_key()):
        raise CAError(f"{key_path} does not match {d / (files.root + '.crt')}")
    if settings.leaf_lifetime <= timedelta(0):
        raise CAError(f"corrupt CA in {d}: leaf_lifetime_seconds must be positive")
    signer = issuer.Signer(key, root, (chain,) if chain is not None else ())
    return CAMaterial(d, settings, signer, previous, files)


def settings_stamp(directory: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """Changes whenever ``ca.json`` is replaced (a rotation's commit point): how the server
    notices that another process rotated the root."""
    try:
        st = (Path(directory) / SETTINGS).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


# -- transactions -------------------------------------------------------------------------------

@dataclass
class Transaction:
    """What one locked transaction may read and edit. Audit records are appended once the
    changes are on disk."""

    tokens: dict[str, JoinToken]
    ledger: Ledger
    audit: list[dict[str, Any]] = field(default_factory=list)


class CADatabase:
    """Tokens and ledger under the CA's lock, shared between processes."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.journal = IssuedJournal(self.directory / ISSUED)
        self._state_cache: tuple[tuple[int, int, int], dict[str, Any]] | None = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Lock, load, yield for editing, write back what changed, append the audit records.
        Raises CAError when the files cannot be read or written."""
        d = self.directory
        try:
            with locked(d):
                state = _load_json(d / STATE, "CA state")
                txn = Transaction(_load_tokens(d / TOKENS), _ledger(state, self.journal.read()))
                tokens_before = dict(txn.tokens)
                yield txn
                if txn.tokens != tokens_before:
                    body = {
                        "version": FORMAT_VERSION,
                        "tokens": {k: tokens.to_json(r) for k, r in sorted(txn.tokens.items())},
                    }
                    write_private_file(d / TOKENS, (json.dumps(body, indent=2) + "\n").encode())
                after = {"version": FORMAT_VERSION, **ledger.to_json(txn.ledger)}
                if after != {**state, "version": FORMAT_VERSION} or not (d / STATE).exists():
                    write_private_file(d / STATE, (json.dumps(after, indent=1) + "\n").encode())
                self.journal.append(txn.ledger.added)
                self.journal.maybe_compact(txn.ledger, len(txn.ledger.added))
                audit.append(d, txn.audit)
        except OSError as exc:
            raise CAError(f"cannot update the CA state in {d}: {exc}") from exc

    def ledger(self) -> Ledger:
        """The ledger as last written, without the lock (for readers; files are reloaded only
        when they changed). Treat it as read-only. Raises CAError."""
        path = self.directory / STATE
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp, self._state_cache = (0, 0, 0), None
        except OSError as exc:
            raise CAError(f"cannot read {path}: {exc}") from exc
        if stamp != (0, 0, 0) and (self._state_cache is None or self._state_cache[0] != stamp):
            self._state_cache = (stamp, _load_json(path, "CA state"))
        state = self._state_cache[1] if self._state_cache else {}
        return _ledger(state, self.journal.read())


def read_ledger(directory: str | os.PathLike[str]) -> Ledger:
    """The whole ledger, for a one-off reader (the operator's commands). Raises CAError."""
    d = Path(directory)
    return _ledger(_load_json(d / STATE, "CA state"), IssuedJournal(d / ISSUED).read())


class TokenStore:
    """Join-token records in ``tokens.json`` (the operator's ``meshd ca token``)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._db = CADatabase(directory)

    def mint(
        self,
        node: str,
        services: Sequence[str],
        *,
        now: datetime,
        ttl: timedelta,
        uses: int | None = 1,
        who: str = "",
    ) -> tuple[str, JoinToken]:
        """Create and persist a token; returns it (the only time the secret exists) and its
        record. Raises CAError."""
        try:
            token, record = tokens.mint(node, services, now=now, ttl=ttl, uses=uses)
        except ValueError as exc:
            raise CAError(str(exc)) from None
        with self._db.transaction() as txn:
            for token_id in [k for k, r in txn.tokens.items()
                             if tokens.is_stale(r, now, KEEP_SPENT_TOKENS)]:
                del txn.tokens[token_id]
            txn.tokens[record.token_id] = record
            txn.audit.append(audit.event(
                "token", now=now, who=who or audit.operator(), what=f"node/{node}",
                token_id=record.token_id, services=list(record.services),
                not_after=record.expires_at, uses=record.uses_left))
        return token, record

    def redeem(
        self, token: str, *, node: str, services: Sequence[str], now: datetime
    ) -> tuple[JoinToken | None, Refusal | None]:
        """Admit a join and count the use, atomically. Returns the record as it was (None when
        the token is unknown, so callers may log its id) and the refusal (None when admitted)."""
        with self._db.transaction() as txn:
            return redeem(txn, token, node=node, services=services, now=now,
                          ca_dir=str(self._db.directory))


def redeem(
    txn: Transaction, token: str, *, node: str, services: Sequence[str], now: datetime,
    ca_dir: str | None = None,
) -> tuple[JoinToken | None, Refusal | None]:
    """``TokenStore.redeem`` inside a caller's transaction: the token's checks, then the
    ledger's (a revoked node needs a token minted after its revocation). ``ca_dir`` goes into
    the command a refusal suggests for minting a new token."""
    parts = tokens.split_token(token)
    record = txn.tokens.get(parts[0]) if parts is not None else None
    refusal = tokens.admit(record, token, node=node, services=services, now=now, ca_dir=ca_dir)
    if refusal is None and record is not None:
        refusal = ledger.refuse_join(txn.ledger, record)
    if refusal is None and record is not None:
        txn.tokens[record.token_id] = tokens.consume(record)
    return record, refusal


# -- internals ---------------------------------------------------------------------------------

@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _load_tokens(path: Path) -> dict[str, JoinToken]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise CAError(f"corrupt join-token file {path}: {exc}") from exc
    try:
        return {
            token_id: tokens.from_json(token_id, obj) for token_id, obj in raw["tokens"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CAError(f"corrupt join-token file {path}: {exc}") from exc


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise CAError(f"corrupt {what} file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise CAError(f"corrupt {what} file {path}: not a JSON object")
    return raw


def _ledger(state: dict[str, Any], issued: dict[str, IssuedRecord]) -> Ledger:
    """The ledger of ``state.json``'s body and a copy of the journal's records."""
    try:
        result = ledger.from_json(state)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CAError(f"corrupt CA state: {exc}") from exc
    result.issued = dict(issued)
    return result


def settings_json(
    settings: CAStoreSettings, files: RootFiles, root: x509.Certificate, now: datetime
) -> bytes:
    body: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "trust_domain": settings.trust_domain,
        "leaf_lifetime_seconds": int(settings.leaf_lifetime.total_seconds()),
        "root_fingerprint": keys.fingerprint(root),
        "root": files.root,
        "root_generation": files.generation,
        "previous_root": files.previous_root,
        "cross_cert": files.cross_cert,
        "updated_at": timestamps.format_time(now),
    }
    return (json.dumps(body, indent=2) + "\n").encode()
