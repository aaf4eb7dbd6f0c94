"""``PUT /v1/txn`` for KV operations (docs/consul-api.md §9.3): all or nothing, at one index. Pure.

The ops run in order against an overlay of the KV table, so a later op sees what an earlier one
did; every failing op is reported (``OpIndex`` + ``What``, Consul's texts) and then nothing is
written. Node, Service and Check ops are not supported by the embedded registry: such a body is
refused with a 400 rather than half-executed.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from meshd.registry.embedded.store.decode import DecodeError, Schema, decode_object
from meshd.registry.embedded.store.records import ApiError, KVEntry, Mutation, Op
from meshd.registry.embedded.store.sessions import SessionWrites

MAX_TXN_OPS = 64
READ_VERBS = ("get", "get-tree", "check-index", "check-session", "check-not-exists")
VERBS = ("set", "cas", "lock", "unlock", "delete", "delete-tree", "delete-cas", *READ_VERBS)

KV_OP_SCHEMA = Schema(
    "api.KVTxnOp",
    {"Verb": "str", "Key": "str", "Value": "any", "Flags": "int", "Index": "int",
     "Session": "str", "Namespace": "str", "Partition": "str"},
)
TXN_OP_SCHEMA = Schema(
    "api.TxnOp", {"KV": KV_OP_SCHEMA, "Node": "any", "Service": "any", "Check": "any"},
)


@dataclass(frozen=True)
class KVOp:
    verb: str
    key: str
    value: bytes
    flags: int
    index: int
    session: str


@dataclass(frozen=True)
class TxnResult:
    status: int  # 200 or 409
    body: dict[str, Any]
    read_only: bool


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def decode_txn(body: bytes, max_value: int) -> list[KVOp]:
    """The request body as KV ops; refusals are Consul's 400/413 texts."""
    try:
        raw = json.loads(body) if body.strip() else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Failed to parse body: {exc}") from exc
    if not isinstance(raw, list):
        raise ApiError(400, "Failed to parse body: json: cannot unmarshal "
                            f"{type(raw).__name__} into Go value of type api.TxnOps")
    if len(raw) > MAX_TXN_OPS:
        raise ApiError(413, f"Transaction contains too many operations ({len(raw)} > "
                            f"{MAX_TXN_OPS})")
    ops = []
    for item in raw:
        if not isinstance(item, dict):
            raise ApiError(400, "Failed to parse body: expected an object per operation")
        try:
            op = decode_object(TXN_OP_SCHEMA, item)
        except DecodeError as exc:
            raise ApiError(400, exc.text.replace("Request decode failed",
                                                 "Failed to parse body")) from exc
        if set(op) - {"KV"}:
            raise ApiError(400, "Failed to parse body: the embedded registry supports only KV "
                                "operations in transactions")
        kv = op.get("KV")
        if kv is None:
            raise ApiError(400, "Failed to parse body: an operation has no KV member")
        ops.append(_kv_op(kv, max_value))
    return ops


def _kv_op(kv: Mapping[str, Any], max_value: int) -> KVOp:
    value = kv.get("Value")
    data = b""
    if value is not None:
        if not isinstance(value, str):
            raise ApiError(400, "Failed to parse body: json: cannot unmarshal Value into Go "
                                "struct field KVTxnOp.Value of type []uint8")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, f"Failed to parse body: illegal base64 data: {exc}") from exc
    key = kv.get("Key", "")
    if len(data) > max_value:
        raise ApiError(413, f"Value for key {_quote(key)} is too large ({len(data)} > "
                            f"{max_value} bytes)")
    return KVOp(verb=kv.get("Verb", ""), key=key, value=data, flags=kv.get("Flags", 0),
                index=kv.get("Index", 0), session=kv.get("Session", ""))


class _Overlay:
    """The KV table as the transaction has changed it so far."""

    def __init__(self, state: SessionWrites) -> None:
        self.state = state
        self.changed: dict[str, KVEntry | None] = {}
        self.ops: list[Op] = []

    def get(self, key: str) -> KVEntry | None:
        if key in self.changed:
            return self.changed[key]
        return self.state.kv.get(key)

    def tree(self, prefix: str) -> list[KVEntry]:
        keys = {e.key for e in self.state.kv.list_prefix(prefix)}
        keys |= {k for k in self.changed if k.startswith(prefix)}
        found = (self.get(k) for k in sorted(keys))
        return [e for e in found if e is not None]

    def put(self, entry: KVEntry) -> KVEntry:
        self.changed[entry.key] = entry
        self.ops.append(Op("kv", entry.key, entry))
        return entry

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.changed[key] = None
            self.ops.append(Op("kv", key, None))


def plan_txn(state: SessionWrites, ops: list[KVOp], now: float) -> Mutation:
    index = state.index + 1
    view = _Overlay(state)
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for position, op in enumerate(ops):
        try:
            entries = _run(view, op, index, now)
        except _OpFailed as exc:
            errors.append({"OpIndex": position, "What": str(exc)})
            continue
        results.extend({"KV": _result_json(e, op.verb in ("get", "get-tree"))} for e in entries)
    read_only = all(op.verb in READ_VERBS for op in ops)
    if errors:
        return Mutation(result=TxnResult(409, {"Results": None, "Errors": errors}, read_only))
    body = {"Results": results, "Errors": None}
    if not view.ops:
        return Mutation(result=TxnResult(200, body, read_only))
    return Mutation(index=index, ops=tuple(view.ops), result=TxnResult(200, body, read_only))


class _OpFailed(Exception):
    pass


def _write(view: _Overlay, op: KVOp, index: int, **changes: Any) -> KVEntry:
    existing = view.get(op.key)
    if existing is None:
        return view.put(KVEntry(key=op.key, value=op.value, flags=op.flags, create_index=index,
                                modify_index=index, **changes))
    return view.put(replace(existing, value=op.value, flags=op.flags, modify_index=index,
                            **changes))


def _run(view: _Overlay, op: KVOp, index: int, now: float) -> list[KVEntry]:
    key, verb = op.key, op.verb
    existing = view.get(key)
    if verb not in VERBS:
        raise _OpFailed(f"unknown KV verb {_quote(verb)}")
    if not key and verb not in ("get-tree", "delete-tree"):
        raise _OpFailed("Missing key name")
    if verb == "set":
        return [_write(view, op, index)]
    if verb == "cas":
        current = existing.modify_index if existing is not None else 0
        if current != op.index:
            raise _OpFailed(f"failed to set key {_quote(key)}, index is stale")
        return [_write(view, op, index)]
    if verb == "lock":
        if op.session not in view.state.sessions:
            raise _OpFailed(f"Invalid session {_quote(op.session)}")
        if existing is not None and existing.session:
            if existing.session != op.session:
                raise _OpFailed(f"failed to lock key {_quote(key)}, lock is already held")
            return [_write(view, op, index)]
        if view.state.kv.lock_delay.get(key, 0.0) > now:
            raise _OpFailed(f"failed to lock key {_quote(key)}, lock delay is in effect")
        lock_index = (existing.lock_index if existing is not None else 0) + 1
        return [_write(view, op, index, session=op.session, lock_index=lock_index)]
    if verb == "unlock":
        if existing is None or existing.session != op.session:
            raise _OpFailed(f"failed to unlock key {_quote(key)}, lock isn't held, or is held "
                            "by another session")
        return [_write(view, op, index, session="")]
    if verb in ("get", "check-index", "check-session"):
        if existing is None:
            raise _OpFailed(f"key {_quote(key)} doesn't exist")
        if verb == "check-index" and existing.modify_index != op.index:
            raise _OpFailed(f"current modify index {existing.modify_index} != {op.index}")
        if verb == "check-session" and existing.session != op.session:
            raise _OpFailed(f"current session {_quote(existing.session)} != "
                            f"{_quote(op.session)}")
        return [existing]
    if verb == "get-tree":
        return view.tree(key)
    if verb == "check-not-exists":
        if existing is not None:
            raise _OpFailed(f"key {_quote(key)} exists")
        return []
    if verb == "delete":
        view.delete([key] if existing is not None else [])
        return []
    if verb == "delete-cas":
        if existing is not None and existing.modify_index != op.index:
            raise _OpFailed(f"failed to delete key {_quote(key)}, index is stale")
        view.delete([key] if existing is not None else [])
        return []
    view.delete(e.key for e in view.tree(key))  # delete-tree
    return []


def _result_json(entry: KVEntry, with_value: bool) -> dict[str, Any]:
    value = (base64.b64encode(entry.value).decode("ascii")
             if with_value and entry.value else None)
    out: dict[str, Any] = {"LockIndex": entry.lock_index, "Key": entry.key,
                           "Flags": entry.flags, "Value": value}
    if entry.session:
        out["Session"] = entry.session
    out.update(CreateIndex=entry.create_index, ModifyIndex=entry.modify_index)
    return out
