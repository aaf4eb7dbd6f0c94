"""The mesh config in the registry's KV: the one place that knows its key (``ROUTES_KEY``), its
encoding, and how it is written and judged. ``meshd routes``, ``meshd up``, the console and every
meshd's watcher go through here.

What is written is always a signed envelope (``meshd.identity.signing``) of the canonical form
of a validated table, ``routes_to_data(table)``, signed by an operator certificate of the mesh CA
(``OperatorKey``); every meshd verifies it against its trust bundle and deny list before applying
it (``judge_stored``), so whoever can only write the registry can deny service but never open a
door. Every write names the ModifyIndex it was based on (check-and-set); if the key moved
meanwhile nothing is written and ``ConfigConflict`` says from which index to which, with the
value now stored, so the caller can show it: two operators never overwrite each other silently.

``RouteConfigStore`` is async over a ``KV`` (meshd's one Consul adapter, httpx, or a KV in
memory), so it runs under trio (the CLI, ``meshd up``) and asyncio (the console) alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from meshd.config.routes import parse_routes, routes_to_data
from meshd.config.schema import RouteTable
from meshd.errors import ConfigError, MeshError, Problem
from meshd.identity.certs import TrustBundle
from meshd.identity.signing import (
    SignatureRefused,
    Signed,
    canonical_bytes,
    inspect,
    is_envelope,
    next_version,
    sign,
    verify,
)
from meshd.registry.consul import Blocking
from meshd.registry.operator_key import HOW_TO_SIGN, OperatorKey

ROUTES_KEY = "meshd/config/routes"
KIND = "routes"


def encode_routes(table: RouteTable) -> bytes:
    """The canonical bytes of a route table, unsigned (what an envelope's payload carries)."""
    return json.dumps(routes_to_data(table), sort_keys=True).encode()


def encode_signed(table: RouteTable, signer: OperatorKey, *, version: int,
                  now: datetime) -> bytes:
    """The bytes stored in KV for ``table``: its envelope signed by ``signer``. ConfigError
    when the key does not belong to the certificate."""
    try:
        envelope = sign(KIND, routes_to_data(table), version=version, now=now,
                        trust_domain=signer.trust_domain, key_pem=signer.key_pem,
                        cert_pem=signer.cert_pem)
    except ValueError as exc:
        raise ConfigError([Problem(f"operator {signer.name}", "operator-key", str(exc))]) from exc
    return canonical_bytes(envelope)


def _json_object(raw: bytes, source: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError([Problem(source, "", f"invalid JSON: {exc}")]) from exc
    if not isinstance(data, dict):
        raise ConfigError([Problem(source, "", "expected a JSON object")])
    return data


@dataclass(frozen=True)
class Refused:
    """Why a meshd does not apply what the registry holds; the table in force stays.
    ``code``: ``missing``, ``empty``, ``invalid``, or a ``SignatureRefused`` code (``unsigned``,
    ``unknown_signer``, ``revoked``, ``bad_signature``, ``replay``, ``from_the_future``...)."""

    code: str
    reason: str


@dataclass(frozen=True)
class Trust:
    """What a meshd verifies the stored table against: its trust bundle and deny list, the
    signed table in force (an older one is a replay), and its clock."""

    bundle: TrustBundle
    denied: frozenset[str]
    now: datetime
    in_force: Signed | None = None


@dataclass(frozen=True)
class Accepted:
    """A verified, valid table; ``raw``: its envelope as stored (kept on disk, verified again
    at the next start)."""

    table: RouteTable
    signed: Signed
    raw: bytes


def judge_stored(raw: bytes | None, trust: Trust, source: str = f"registry kv {ROUTES_KEY}",
                 ) -> Accepted | Refused:
    """What a meshd makes of the stored value (None: the key is absent). Pure.

    Fail closed: a missing key, an unsigned table, one whose signature does not verify against
    ``trust`` (unknown or revoked signer, altered, older than the one in force, dated ahead), a
    table without destinations or one that does not validate never replaces the table in
    force; only an operator's signed `meshd routes clear` (a table marked ``clear``) empties
    it."""
    stays = "the route table in force stays"
    if raw is None:
        return Refused("missing", f"{source} is missing from the registry; {stays} (an "
                       "operator empties it with `meshd routes clear`)")
    try:
        envelope = _json_object(raw, source)
    except ConfigError as exc:
        return Refused("invalid", str(exc))
    try:
        signed = verify(envelope, KIND, bundle=trust.bundle, denied=trust.denied,
                        now=trust.now, in_force=trust.in_force)
    except SignatureRefused as exc:
        return Refused(exc.code, f"{source}: {exc.reason}; {stays}")
    try:
        if not isinstance(signed.data, dict):
            raise ConfigError([Problem(source, "", "the signed data is not a JSON object")])
        table = parse_routes(signed.data, source)
    except ConfigError as exc:
        return Refused("invalid", str(exc))
    if not table.destinations and not table.cleared:
        return Refused("empty", f"{source} holds a table without destinations; {stays} (an "
                       "operator empties it with `meshd routes clear`)")
    return Accepted(table, signed, raw)


class KV(Protocol):
    """What the store needs of a registry: one key read, one check-and-set write."""

    @property
    def base_url(self) -> str: ...

    async def kv_get(self, key: str) -> Blocking: ...

    async def kv_put(self, key: str, value: bytes, *, cas: int | None = None) -> bool: ...


@dataclass(frozen=True)
class StoredRoutes:
    """The route table stored in KV and its ModifyIndex (0: the key does not exist, which means
    an empty table), and who signed it (None: absent, or unsigned, which every meshd refuses)."""

    table: RouteTable
    modify_index: int
    signed: Signed | None = None

    @property
    def data(self) -> dict[str, Any]:
        """The table in its canonical mapping form."""
        return routes_to_data(self.table)


class ConfigConflict(MeshError):
    """The key moved between our read and our write: nothing was written."""

    def __init__(self, key: str, expected: int, current: StoredRoutes | None,
                 current_error: ConfigError | None = None) -> None:
        self.key = key
        self.expected = expected
        self.current = current
        self.current_error = current_error
        moved_to = current.modify_index if current is not None else "?"
        super().__init__(
            f"conflict: {key} changed while this command ran (ModifyIndex {expected} -> "
            f"{moved_to}); who changed what is unknown. Nothing was written.")


class RouteConfigStore:
    """``signer``: the operator certificate writes are signed with (none: reads only);
    ``bundle``: verify what is read against it (else the signer shown is what the envelope
    claims; every meshd verifies before applying)."""

    def __init__(self, client: KV, key: str = ROUTES_KEY, *, signer: OperatorKey | None = None,
                 bundle: TrustBundle | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.client = client
        self.key = key
        self.signer = signer
        self.bundle = bundle
        self.clock = clock

    @property
    def source(self) -> str:
        return f"registry kv {self.key}"

    async def current_index(self) -> int:
        """The key's ModifyIndex (0 when absent), whatever its value."""
        answer = await self.client.kv_get(self.key)
        return answer.data.modify_index if answer.data is not None else 0

    async def read(self) -> StoredRoutes:
        """The stored table; ``ConfigError`` when the stored value is not a valid table."""
        answer = await self.client.kv_get(self.key)
        if answer.data is None:
            return StoredRoutes(RouteTable(), 0)
        data, signed = self._unwrap(answer.data.value)
        return StoredRoutes(parse_routes(data, self.source), answer.data.modify_index, signed)

    def _unwrap(self, raw: bytes) -> tuple[dict[str, Any], Signed | None]:
        """The table's mapping in a stored value and its signature (None: unsigned)."""
        obj = _json_object(raw, self.source)
        if not is_envelope(obj):
            return obj, None
        try:
            signed = (inspect(obj, KIND) if self.bundle is None else
                      verify(obj, KIND, bundle=self.bundle, denied=(), now=self.clock()))
        except SignatureRefused as exc:
            raise ConfigError([Problem(self.source, "", str(exc))]) from exc
        if not isinstance(signed.data, dict):
            raise ConfigError([Problem(self.source, "", "the signed data is not a JSON object")])
        return signed.data, signed

    async def peek(self) -> tuple[dict[str, Any] | None, int]:
        """What is stored as a JSON object, not validated nor verified (the signed table's, when
        signed; None: absent, or not a JSON object), and its ModifyIndex: a console shows even
        a table every meshd refuses."""
        answer = await self.client.kv_get(self.key)
        if answer.data is None:
            return None, 0
        try:
            data: dict[str, Any] | None = _json_object(answer.data.value, self.source)
            if is_envelope(data):
                data = inspect(data, KIND).data
        except (ConfigError, SignatureRefused):
            data = None
        return data if isinstance(data, dict) else None, answer.data.modify_index

    async def write(self, table: RouteTable, base: StoredRoutes) -> StoredRoutes:
        """Store ``table`` in place of ``base`` (what was read): only if the key's ModifyIndex
        is still ``base.modify_index`` (0: only if absent), signed with a version past
        ``base``'s. Returns what is stored afterwards; raises ``ConfigConflict`` if the key
        moved, and ``ConfigError`` for a table without destinations that is not marked
        ``clear`` (every meshd would refuse it) and without an operator certificate."""
        version = base.signed.version if base.signed is not None else None
        return await self._write(table, base.modify_index, version)

    async def _write(self, table: RouteTable, cas: int, stored_version: int | None,
                     ) -> StoredRoutes:
        if not table.destinations and not table.cleared:
            raise ConfigError([Problem(self.source, "destinations", "no destinations: every "
                                       "meshd would refuse the table and keep its own; empty "
                                       "the table on purpose with `meshd routes clear`")])
        if self.signer is None:
            raise ConfigError([Problem(self.source, "signature", HOW_TO_SIGN)])
        now = self.clock()
        raw = encode_signed(table, self.signer, now=now,
                            version=next_version(now, stored_version))
        if await self.client.kv_put(self.key, raw, cas=cas):
            return StoredRoutes(table, await self.current_index(),
                                inspect(json.loads(raw), KIND))
        try:
            current: StoredRoutes | None = await self.read()
            error = None
        except ConfigError as exc:
            current, error = StoredRoutes(RouteTable(), await self.current_index()), exc
        raise ConfigConflict(self.key, cas, current, error)

    async def apply(self, table: RouteTable) -> StoredRoutes:
        """Replace the stored table (whatever it was) with ``table``, unless it changes between
        our read of its index (and of its version, which the new one follows) and our write."""
        answer = await self.client.kv_get(self.key)
        if answer.data is None:
            return await self._write(table, 0, None)
        try:
            version: int | None = inspect(json.loads(answer.data.value), KIND).version
        except (ValueError, SignatureRefused):
            version = None
        return await self._write(table, answer.data.modify_index, version)

    async def clear(self) -> StoredRoutes:
        """Empty the table on purpose: every meshd applies it (no routes, no rules; services
        then follow ``default_policy = "deny"``)."""
        return await self.apply(RouteTable(cleared=True))

    async def set_split(self, service: str, weights: Mapping[str, int]) -> tuple[StoredRoutes,
                                                                                 StoredRoutes]:
        """Change one destination's split; returns (before, after). The result is validated
        like a routes.toml (unknown subsets, weights not summing to 100 are refused)."""
        before = await self.read()
        data = before.data
        destination = data["destinations"].get(service)
        if destination is None:
            known = ", ".join(sorted(data["destinations"])) or "none"
            raise ConfigError([Problem(self.source, f"destinations.{service}",
                                       f"no such destination in the route table (known: "
                                       f"{known}); declare it and its subsets in routes.toml "
                                       "and apply that")])
        destination["split"] = dict(weights)
        table = parse_routes(data, f"set-split {service}")
        return before, await self.write(table, before)
