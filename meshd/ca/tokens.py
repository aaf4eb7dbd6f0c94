"""Join tokens, pure: minting, the admission decision, and their JSON form.

A token reads ``<id>.<secret>`` (like kubeadm's bootstrap tokens): the id names the record and
may appear in logs; the secret is shown once to the operator and the CA keeps only its SHA-256.
A record binds the token to one node name and the services that node may claim, with an expiry
and a number of uses left: one by default, because a joined node renews with its node certificate
and never needs its token again (``None``, any number of uses until expiry, is only minted when a
caller asks for it).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from meshd.identity.spiffe import check_name
from meshd.timestamps import format_time, parse_time

_TOKEN = re.compile(r"([0-9a-f]{8})\.([A-Za-z0-9_-]{32,128})")


@dataclass(frozen=True)
class JoinToken:
    """The CA's record of a token (never the secret itself)."""

    token_id: str
    secret_sha256: str
    node: str
    services: tuple[str, ...]
    created_at: datetime
    expires_at: datetime
    uses_left: int | None  # None: any number of uses until expiry


@dataclass(frozen=True)
class Refusal:
    """Why a join is refused: HTTP status, a short code, and a sentence for the requester."""

    status: int
    code: str
    reason: str


def mint(
    node: str,
    services: Iterable[str],
    *,
    now: datetime,
    ttl: timedelta,
    uses: int | None = 1,
) -> tuple[str, JoinToken]:
    """A new token and its record (single use unless ``uses`` says otherwise). Raises
    ValueError for bad names, ttl or uses."""
    check_name(node, "node")
    names = tuple(dict.fromkeys(check_name(s) for s in services))
    if not names:
        raise ValueError("a join token must allow at least one service")
    if ttl <= timedelta(0):
        raise ValueError("token ttl must be positive")
    if uses is not None and uses < 1:
        raise ValueError("token uses must be at least 1")
    token_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    record = JoinToken(
        token_id=token_id,
        secret_sha256=_digest(secret),
        node=node,
        services=names,
        created_at=now,
        expires_at=now + ttl,
        uses_left=uses,
    )
    return f"{token_id}.{secret}", record


def split_token(token: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed token, else None."""
    match = _TOKEN.fullmatch(token)
    return (match.group(1), match.group(2)) if match else None


CA_DIR_PLACEHOLDER = "CA_DIR"


def mint_command(record: JoinToken, ca_dir: str | None = None) -> str:
    """The command that mints a token like ``record`` again (same node, same services)."""
    return (f"meshd ca token --dir {ca_dir or CA_DIR_PLACEHOLDER} --node {record.node} "
            f"--services {','.join(record.services)}")


def _mint_again(record: JoinToken, ca_dir: str | None) -> str:
    return (f": mint a new one on the CA host with `{mint_command(record, ca_dir)}` and put it "
            "in the host's join token file ([ca] token_file)")


def admit(
    record: JoinToken | None,
    token: str,
    *,
    node: str,
    services: Iterable[str],
    now: datetime,
    ca_dir: str | None = None,
) -> Refusal | None:
    """Decide a join: None to admit, else why not. ``record`` is the record for the token's id
    (None if unknown). Checks, in order: the secret, expiry, uses left, node, each service. An
    expired or used-up token's refusal says how to mint a new one (in ``ca_dir``, the CA's
    directory, when given); only the holder of the token's secret reads it."""
    parts = split_token(token)
    if record is None or parts is None or not hmac.compare_digest(
        _digest(parts[1]), record.secret_sha256
    ):
        return Refusal(401, "invalid_token", "the join token is unknown or invalid")
    if now >= record.expires_at:
        return Refusal(
            401, "token_expired", f"the join token expired at {format_time(record.expires_at)}"
            + _mint_again(record, ca_dir))
    if record.uses_left is not None and record.uses_left <= 0:
        return Refusal(401, "token_used_up",
                       "the join token has been used up" + _mint_again(record, ca_dir))
    if node != record.node:
        return Refusal(403, "node_not_allowed", f"the join token is not valid for node {node!r}")
    for service in services:
        if service not in record.services:
            return Refusal(
                403, "service_not_allowed", f"the join token does not allow service {service!r}"
            )
    return None


def consume(record: JoinToken) -> JoinToken:
    """The record after one successful use."""
    if record.uses_left is None:
        return record
    return replace(record, uses_left=max(record.uses_left - 1, 0))


def is_stale(record: JoinToken, now: datetime, keep: timedelta) -> bool:
    """Whether a record can be forgotten: expired more than ``keep`` ago. Expired and used-up
    records are kept that long so refusals can still say why."""
    return now >= record.expires_at + keep


def to_json(record: JoinToken) -> dict[str, Any]:
    return {
        "secret_sha256": record.secret_sha256,
        "node": record.node,
        "services": list(record.services),
        "created_at": format_time(record.created_at),
        "expires_at": format_time(record.expires_at),
        "uses_left": record.uses_left,
    }


def from_json(token_id: str, obj: Mapping[str, Any]) -> JoinToken:
    """Parse one record; raises ValueError (or KeyError/TypeError, which callers treat alike)."""
    uses = obj["uses_left"]
    if uses is not None and not isinstance(uses, int):
        raise ValueError(f"token {token_id}: uses_left must be an integer or null")
    return JoinToken(
        token_id=token_id,
        secret_sha256=str(obj["secret_sha256"]),
        node=str(obj["node"]),
        services=tuple(str(s) for s in obj["services"]),
        created_at=parse_time(obj["created_at"]),
        expires_at=parse_time(obj["expires_at"]),
        uses_left=uses,
    )


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
