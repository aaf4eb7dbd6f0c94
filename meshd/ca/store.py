"""The CA directory: root key and certificate, settings, join tokens.

Layout (directory 0700)::

    root.key     ECDSA P-256, PKCS#8 PEM, 0600
    root.crt     the self-signed root
    ca.json      {"version": 1, "trust_domain": ..., "leaf_lifetime_seconds": ..., ...}
    tokens.json  join-token records (hashes only), 0600
    tokens.lock  flock(2) taken around every read-modify-write of tokens.json

``meshd ca token`` and ``meshd ca serve`` run at the same time as separate processes, so tokens are
never cached: each redemption locks, reads, decides, writes atomically and unlocks. All functions
here block (disk, flock); the server calls them through ``trio.to_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from meshd.ca import issuer, tokens
from meshd.ca.files import ensure_private_dir, write_private_file, write_public_file
from meshd.ca.spiffe import check_trust_domain
from meshd.ca.tokens import JoinToken, Refusal
from meshd.errors import CAError

log = logging.getLogger(__name__)

ROOT_KEY = "root.key"
ROOT_CERT = "root.crt"
SETTINGS = "ca.json"
TOKENS = "tokens.json"
TOKENS_LOCK = "tokens.lock"
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
class CAMaterial:
    """A loaded CA: its settings and the signer (root key + certificate)."""

    directory: Path
    settings: CAStoreSettings
    signer: issuer.Signer

    @property
    def trust_domain(self) -> str:
        return self.settings.trust_domain

    @property
    def fingerprint(self) -> str:
        return issuer.fingerprint(self.signer.cert)

    def roots(self) -> list[x509.Certificate]:
        """The trust bundle (one root until root rotation adds its successor)."""
        return [self.signer.cert]


def init_ca(
    directory: str | os.PathLike[str],
    trust_domain: str,
    *,
    now: datetime,
    leaf_lifetime: timedelta = issuer.DEFAULT_LEAF_LIFETIME,
    force: bool = False,
) -> CAMaterial:
    """Create a new root in ``directory``. Refuses to replace an existing CA unless ``force``
    (which also forgets its join tokens: they were minted for the old root). Raises CAError."""
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
    key = issuer.new_private_key()
    root = issuer.build_root(key, trust_domain, now)
    settings = CAStoreSettings(trust_domain, leaf_lifetime)
    try:
        ensure_private_dir(d)
        with _tokens_locked(d):
            (d / TOKENS).unlink(missing_ok=True)
        write_private_file(d / ROOT_KEY, issuer.private_key_pem(key))
        write_public_file(d / ROOT_CERT, issuer.cert_pem(root))
        write_public_file(d / SETTINGS, _settings_json(settings, root, now))
    except OSError as exc:
        raise CAError(f"cannot initialise CA in {d}: {exc}") from exc
    return CAMaterial(d, settings, issuer.Signer(key, root))


def load_ca(directory: str | os.PathLike[str]) -> CAMaterial:
    """Load the CA in ``directory``. Raises CAError if it is missing, inconsistent, or its key is
    readable by others."""
    d = Path(directory)
    key_path = d / ROOT_KEY
    try:
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise CAError(
                f"{key_path} is accessible by group or others (mode {mode:04o}); chmod 600 it"
            )
        key = issuer.load_private_key_pem(key_path.read_bytes())
        root = x509.load_pem_x509_certificate((d / ROOT_CERT).read_bytes())
        raw = json.loads((d / SETTINGS).read_text())
        settings = CAStoreSettings(
            trust_domain=check_trust_domain(str(raw["trust_domain"])),
            leaf_lifetime=timedelta(seconds=int(raw["leaf_lifetime_seconds"])),
        )
    except FileNotFoundError as exc:
        raise CAError(f"no CA in {d} ({exc.filename} missing); run `meshd ca init` first") from exc
    except OSError as exc:
        raise CAError(f"cannot read CA in {d}: {exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise CAError(f"corrupt CA in {d}: {exc}") from exc
    if not issuer.same_public_key(key.public_key(), root.public_key()):
        raise CAError(f"{key_path} does not match {d / ROOT_CERT}")
    if settings.leaf_lifetime <= timedelta(0):
        raise CAError(f"corrupt CA in {d}: leaf_lifetime_seconds must be positive")
    return CAMaterial(d, settings, issuer.Signer(key, root))


class TokenStore:
    """Join-token records in ``tokens.json``, shared between processes under a file lock."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._dir = Path(directory)

    def mint(
        self,
        node: str,
        services: Sequence[str],
        *,
        now: datetime,
        ttl: timedelta,
        uses: int | None = None,
    ) -> tuple[str, JoinToken]:
        """Create and persist a token; returns it (the only time the secret exists) and its
        record. Raises CAError."""
        try:
            token, record = tokens.mint(node, services, now=now, ttl=ttl, uses=uses)
        except ValueError as exc:
            raise CAError(str(exc)) from None
        with self._transaction() as records:
            stale = [k for k, r in records.items() if tokens.is_stale(r, now, KEEP_SPENT_TOKENS)]
            for token_id in stale:
                del records[token_id]
            records[record.token_id] = record
        return token, record

    def redeem(
        self, token: str, *, node: str, services: Sequence[str], now: datetime
    ) -> tuple[JoinToken | None, Refusal | None]:
        """Admit a join and count the use, atomically. Returns the record as it was (None when
        the token is unknown, so callers may log its id) and the refusal (None when admitted)."""
        parts = tokens.split_token(token)
        if parts is None:
            return None, tokens.admit(None, token, node=node, services=services, now=now)
        with self._transaction() as records:
            record = records.get(parts[0])
            refusal = tokens.admit(record, token, node=node, services=services, now=now)
            if refusal is None and record is not None:
                records[record.token_id] = tokens.consume(record)
        return record, refusal

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[dict[str, JoinToken]]:
        """Lock, load, yield the records for editing, write them back if they changed."""
        path = self._dir / TOKENS
        try:
            with _tokens_locked(self._dir):
                records = _load_tokens(path)
                before = dict(records)
                yield records
                if records != before:
                    body = {
                        "version": FORMAT_VERSION,
                        "tokens": {k: tokens.to_json(r) for k, r in sorted(records.items())},
                    }
                    write_private_file(path, (json.dumps(body, indent=2) + "\n").encode())
        except OSError as exc:
            raise CAError(f"cannot update join tokens in {path}: {exc}") from exc


@contextlib.contextmanager
def _tokens_locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / TOKENS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
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


def _settings_json(settings: CAStoreSettings, root: x509.Certificate, now: datetime) -> bytes:
    body: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "trust_domain": settings.trust_domain,
        "leaf_lifetime_seconds": int(settings.leaf_lifetime.total_seconds()),
        "root_fingerprint": issuer.fingerprint(root),
        "created_at": tokens.format_time(now),
    }
    return (json.dumps(body, indent=2) + "\n").encode()
