"""What the CA remembers between requests, and the decisions taken from it. Pure.

The ledger holds

* **nodes**: every joined node, the services it may claim (from its join token), whether it is
  revoked, and its issuance batches. A join or a renewal issues one *batch* (the node certificate
  and the service certificates, together); a node *confirms* a batch when it authenticates with
  that batch's node certificate, which proves it wrote the batch to disk and moved to it. Batches
  older than the confirmed one are *superseded*: nothing on that node depends on them any more.
* **issued**: every certificate still valid (serial, kind, name, node, issuing root, expiry),
  kept by the store in an append-only journal (a renewal adds lines, it never rewrites them).
* **revoked**: revoked serials until they expire: the deny list every meshd applies.
* **renewal request**: the operator's "renew now" (``meshd ca rotate --finish``): every node
  whose node certificate was issued before a time (and, when it names one, by a root) is told so
  on its next deny-list poll, and renews within a spread of seconds.

``store`` keeps it in ``state.json`` and edits it under the CA's lock; ``server`` and ``command``
ask it questions. Nothing here reads the clock, the disk or the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from meshd.ca.tokens import JoinToken, Refusal
from meshd.identity.spiffe import Kind, parse_identity
from meshd.timestamps import format_time, parse_time


@dataclass(frozen=True)
class NodeRecord:
    name: str
    services: tuple[str, ...]
    joined_at: datetime
    token_id: str | None = None
    revoked_at: datetime | None = None
    batch: int = 0            # the latest batch issued to the node
    confirmed_batch: int = 0  # the latest batch the node has shown it holds


@dataclass(frozen=True)
class IssuedRecord:
    serial: str
    kind: Kind
    name: str
    node: str | None       # None: issued offline (`meshd ca issue`)
    root: str              # fingerprint of the root that signed it
    issued_at: datetime
    not_after: datetime
    batch: int = 0

    @property
    def what(self) -> str:
        return f"{self.kind.value}/{self.name}"


@dataclass(frozen=True)
class Revocation:
    serial: str
    not_after: datetime
    revoked_at: datetime
    reason: str


@dataclass(frozen=True)
class RenewalRequest:
    """Nodes holding a node certificate issued before ``before`` (by ``root``, when set) are
    asked to renew, each at a random point within ``spread_seconds``."""

    before: datetime
    root: str | None
    spread_seconds: float
    requested_at: datetime
    who: str = ""


@dataclass
class Ledger:
    """Edited in place inside one locked transaction (``store.CADatabase``). ``added`` lists
    the certificates recorded during the transaction (the store appends them to its journal
    instead of rewriting every record)."""

    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    issued: dict[str, IssuedRecord] = field(default_factory=dict)
    revoked: dict[str, Revocation] = field(default_factory=dict)
    denylist_version: int = 0
    renewal: RenewalRequest | None = None
    added: list[IssuedRecord] = field(default_factory=list, compare=False, repr=False)


# -- joins and renewals -------------------------------------------------------------------------

def refuse_join(ledger: Ledger, token: JoinToken) -> Refusal | None:
    """A revoked node joins again only with a token minted after its revocation (an operator
    deciding to let it back in), never with one it may have kept."""
    node = ledger.nodes.get(token.node)
    if node is not None and node.revoked_at is not None and token.created_at <= node.revoked_at:
        return Refusal(403, "node_revoked",
                       f"node {token.node!r} was revoked at {format_time(node.revoked_at)}; "
                       "it needs a join token minted after that")
    return None


def record_join(ledger: Ledger, token: JoinToken, now: datetime) -> NodeRecord:
    """The node as of this join: it may claim the token's services from now on."""
    previous = ledger.nodes.get(token.node)
    record = NodeRecord(
        name=token.node, services=token.services, joined_at=now, token_id=token.token_id,
        batch=previous.batch if previous else 0,
        confirmed_batch=previous.confirmed_batch if previous else 0,
    )
    ledger.nodes[token.node] = record
    return record


def next_batch(ledger: Ledger, node: str) -> int:
    """Open a new batch for ``node`` (which must be in the ledger) and return its number."""
    record = ledger.nodes[node]
    ledger.nodes[node] = replace(record, batch=record.batch + 1)
    return record.batch + 1


def record_issued(ledger: Ledger, record: IssuedRecord) -> None:
    ledger.issued[record.serial] = record
    ledger.added.append(record)


@dataclass(frozen=True)
class RenewalGrant:
    node: NodeRecord
    peer_serial: str


def authorize_renewal(
    ledger: Ledger,
    *,
    trust_domain: str,
    peer_ids: list[str] | None,
    peer_serial: str | None,
    peer_not_after: datetime | None,
    now: datetime,
) -> RenewalGrant | Refusal:
    """Whether the holder of a (TLS-verified) client certificate may renew at all (which
    services: ``refuse_services``).

    ``peer_ids`` is None when no client certificate was presented. The chain and its validity
    period were checked by TLS; this checks what TLS cannot: that it is a node certificate of our
    trust domain, still in the ledger and not revoked, for a node not revoked."""
    if peer_ids is None or peer_serial is None:
        return Refusal(401, "no_client_certificate",
                       "renewal requires the node certificate (mutual TLS); join tokens are "
                       "only for joining")
    if len(peer_ids) != 1:
        return Refusal(403, "wrong_identity",
                       f"the client certificate carries {len(peer_ids)} SPIFFE IDs, expected one")
    try:
        td, kind, name = parse_identity(peer_ids[0])
    except ValueError as exc:
        return Refusal(403, "wrong_identity", f"client certificate refused: {exc}")
    if td != trust_domain:
        return Refusal(403, "foreign_trust_domain",
                       f"{peer_ids[0]} is not of trust domain {trust_domain}")
    if kind is not Kind.NODE:
        return Refusal(403, "not_a_node_certificate",
                       f"{peer_ids[0]} is a {kind.value} certificate; renewals take the node "
                       "certificate")
    if peer_not_after is not None and peer_not_after <= now:
        return Refusal(403, "certificate_expired",
                       f"the node certificate expired at {format_time(peer_not_after)}")
    revocation = ledger.revoked.get(peer_serial)
    if revocation is not None:
        return Refusal(403, "certificate_revoked",
                       f"certificate {peer_serial} was revoked at "
                       f"{format_time(revocation.revoked_at)} ({revocation.reason})")
    node = ledger.nodes.get(name)
    if node is None:
        return Refusal(403, "unknown_node", f"node {name!r} has not joined this CA")
    if node.revoked_at is not None:
        return Refusal(403, "node_revoked",
                       f"node {name!r} was revoked at {format_time(node.revoked_at)}")
    issued = ledger.issued.get(peer_serial)
    if issued is None or issued.kind is not Kind.NODE or issued.node != name:
        return Refusal(403, "unknown_certificate",
                       f"certificate {peer_serial} is not a node certificate this CA issued "
                       f"to {name!r}")
    return RenewalGrant(node, peer_serial)


def refuse_services(node: NodeRecord, services: Iterable[str]) -> Refusal | None:
    """None if ``node`` may claim every one of ``services``, else why not."""
    for service in services:
        if service not in node.services:
            return Refusal(403, "service_not_allowed",
                           f"node {node.name!r} may not claim service {service!r} (allowed: "
                           f"{', '.join(node.services)})")
    return None


def confirm(ledger: Ledger, node: str, serial: str) -> bool:
    """The node authenticated with node certificate ``serial``: it holds that batch. Returns
    whether the ledger changed."""
    record = ledger.nodes.get(node)
    issued = ledger.issued.get(serial)
    if record is None or issued is None or issued.node != node or issued.kind is not Kind.NODE:
        return False
    if issued.batch <= record.confirmed_batch:
        return False
    ledger.nodes[node] = replace(record, confirmed_batch=issued.batch)
    return True


def renewal_asked(ledger: Ledger, serial: str) -> RenewalRequest | None:
    """The renewal request that applies to the holder of node certificate ``serial`` (what
    the deny-list poll answers it), or None."""
    request = ledger.renewal
    issued = ledger.issued.get(serial)
    if request is None or issued is None or issued.kind is not Kind.NODE:
        return None
    if issued.issued_at >= request.before:
        return None
    if request.root is not None and issued.root != request.root:
        return None
    return request


# -- revocation ---------------------------------------------------------------------------------

def revoke_node(ledger: Ledger, node: str, now: datetime) -> list[Revocation]:
    """Stop renewals for ``node`` and deny every live certificate issued to it. Raises KeyError
    for an unknown node."""
    record = ledger.nodes[node]
    ledger.nodes[node] = replace(record, revoked_at=now)
    out = [
        _revoke(ledger, issued, now, f"node {node} revoked")
        for issued in list(ledger.issued.values())
        if issued.node == node and issued.not_after > now and issued.serial not in ledger.revoked
    ]
    ledger.denylist_version += 1
    return out


def revoke_serial(ledger: Ledger, serial: str, now: datetime) -> Revocation:
    """Deny one certificate. Raises KeyError for a serial the ledger does not know (unknown or
    already expired); returns the existing revocation if it was revoked before."""
    serial = normalize_serial(serial)
    if serial in ledger.revoked:
        return ledger.revoked[serial]
    issued = ledger.issued[serial]
    if issued.not_after <= now:
        raise KeyError(serial)
    revocation = _revoke(ledger, issued, now, f"serial {serial} revoked")
    ledger.denylist_version += 1
    return revocation


def _revoke(ledger: Ledger, issued: IssuedRecord, now: datetime, reason: str) -> Revocation:
    revocation = Revocation(issued.serial, issued.not_after, now, reason)
    ledger.revoked[issued.serial] = revocation
    return revocation


def denylist(ledger: Ledger, now: datetime) -> list[str]:
    """Serials of revoked certificates not yet expired, sorted."""
    return sorted(s for s, r in ledger.revoked.items() if r.not_after > now)


def normalize_serial(serial: str) -> str:
    """``"0x00AB"`` / ``"ab"`` / ``"AB"`` -> ``"ab"`` (as ``keys.serial_hex`` writes them).
    Raises ValueError when it is not hexadecimal."""
    text = serial.strip().lower().removeprefix("0x").replace(":", "")
    return format(int(text, 16), "x")


# -- root rotation ------------------------------------------------------------------------------

def depending_on_root(ledger: Ledger, fingerprint: str, now: datetime) -> list[IssuedRecord]:
    """Certificates signed by root ``fingerprint`` that something may still present: not
    expired, not revoked, and (for a node's certificates) not superseded by a batch the node
    has confirmed. Certificates issued offline count until they expire or are revoked."""
    out = []
    for issued in ledger.issued.values():
        if issued.root != fingerprint or issued.not_after <= now:
            continue
        if issued.serial in ledger.revoked:
            continue
        node = ledger.nodes.get(issued.node) if issued.node else None
        if node is not None and issued.batch < node.confirmed_batch:
            continue
        out.append(issued)
    return sorted(out, key=lambda r: (r.not_after, r.serial))


def prune(ledger: Ledger, now: datetime) -> None:
    """Forget expired certificates and revocations (an expired certificate is refused anyway)."""
    for serial in [s for s, r in ledger.issued.items() if r.not_after <= now]:
        del ledger.issued[serial]
    for serial in [s for s, r in ledger.revoked.items() if r.not_after <= now]:
        del ledger.revoked[serial]


# -- JSON ---------------------------------------------------------------------------------------

def to_json(ledger: Ledger) -> dict[str, Any]:
    """Nodes, revocations and the deny list's version (certificates: ``issued_to_json``, one
    per line of the store's journal)."""
    renewal = ledger.renewal
    return {
        "denylist_version": ledger.denylist_version,
        **({} if renewal is None else {"renewal": {
            "before": format_time(renewal.before), "root": renewal.root,
            "spread_seconds": renewal.spread_seconds,
            "requested_at": format_time(renewal.requested_at), "who": renewal.who,
        }}),
        "nodes": {
            n.name: {
                "services": list(n.services), "joined_at": format_time(n.joined_at),
                "token_id": n.token_id,
                "revoked_at": format_time(n.revoked_at) if n.revoked_at else None,
                "batch": n.batch, "confirmed_batch": n.confirmed_batch,
            }
            for n in sorted(ledger.nodes.values(), key=lambda n: n.name)
        },
        "revoked": {
            r.serial: {"not_after": format_time(r.not_after),
                       "revoked_at": format_time(r.revoked_at), "reason": r.reason}
            for r in sorted(ledger.revoked.values(), key=lambda r: r.serial)
        },
    }


def from_json(obj: Mapping[str, Any], issued: Iterable[IssuedRecord] = ()) -> Ledger:
    """Parse ``to_json``'s form, with the certificates from the journal; raises ValueError,
    KeyError or TypeError when malformed."""
    nodes = {
        name: NodeRecord(
            name=name, services=tuple(str(s) for s in raw["services"]),
            joined_at=parse_time(raw["joined_at"]), token_id=raw.get("token_id"),
            revoked_at=parse_time(raw["revoked_at"]) if raw.get("revoked_at") else None,
            batch=int(raw.get("batch", 0)), confirmed_batch=int(raw.get("confirmed_batch", 0)),
        )
        for name, raw in obj.get("nodes", {}).items()
    }
    revoked = {
        serial: Revocation(serial, parse_time(raw["not_after"]), parse_time(raw["revoked_at"]),
                           str(raw.get("reason", "")))
        for serial, raw in obj.get("revoked", {}).items()
    }
    raw_renewal = obj.get("renewal")
    renewal = None if not raw_renewal else RenewalRequest(
        before=parse_time(raw_renewal["before"]),
        root=str(raw_renewal["root"]) if raw_renewal.get("root") else None,
        spread_seconds=float(raw_renewal["spread_seconds"]),
        requested_at=parse_time(raw_renewal["requested_at"]),
        who=str(raw_renewal.get("who", "")))
    return Ledger(nodes, {r.serial: r for r in issued}, revoked,
                  int(obj.get("denylist_version", 0)), renewal)


def issued_to_json(r: IssuedRecord) -> dict[str, Any]:
    return {
        "serial": r.serial, "kind": r.kind.value, "name": r.name, "node": r.node,
        "root": r.root, "issued_at": format_time(r.issued_at),
        "not_after": format_time(r.not_after), "batch": r.batch,
    }


def issued_from_json(raw: Mapping[str, Any]) -> IssuedRecord:
    return IssuedRecord(
        serial=str(raw["serial"]), kind=Kind(raw["kind"]), name=str(raw["name"]),
        node=str(raw["node"]) if raw.get("node") else None, root=str(raw["root"]),
        issued_at=parse_time(raw["issued_at"]), not_after=parse_time(raw["not_after"]),
        batch=int(raw.get("batch", 0)),
    )
