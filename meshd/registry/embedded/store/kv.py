"""The KV table: entries, deletion tombstones and the index rules of blocking KV reads.

Pure: writes are planned as ``Mutation`` objects (see ``store.records``) and applied later.
Tombstones record the index at which a key was deleted so that a blocking ``recurse``/``keys``
watcher of any prefix containing it sees the removal (docs/consul-api.md §2.1, §8.3). A tombstone is
dropped when its key is written again (the new ModifyIndex is higher anyway).

Locks (``?acquire``/``?release``, txn ``lock``/``unlock``): an entry held by a session names it;
``by_session`` finds a session's keys when it is invalidated, and ``lock_delay`` (memory only, as
in Consul) refuses a new acquisition until the invalidated holder's lock delay has passed.
"""

from __future__ import annotations

import bisect
from dataclasses import replace

from meshd.registry.embedded.store.records import KVEntry, Mutation, Op


class KVStore:
    def __init__(self) -> None:
        self.entries: dict[str, KVEntry] = {}
        self._sorted: list[str] = []
        self.tombstones: dict[str, int] = {}
        self.table_index = 0
        self.by_session: dict[str, set[str]] = {}
        self.lock_delay: dict[str, float] = {}  # key -> time before which acquire is refused

    # --- reads -----------------------------------------------------------------------------------

    def get(self, key: str) -> KVEntry | None:
        return self.entries.get(key)

    def _prefix_keys(self, prefix: str) -> list[str]:
        start = bisect.bisect_left(self._sorted, prefix)
        out = []
        for key in self._sorted[start:]:
            if not key.startswith(prefix):
                break
            out.append(key)
        return out

    def list_prefix(self, prefix: str) -> list[KVEntry]:
        return [self.entries[k] for k in self._prefix_keys(prefix)]

    def list_keys(self, prefix: str, separator: str = "") -> list[str]:
        keys = self._prefix_keys(prefix)
        if not separator:
            return keys
        out: list[str] = []
        for key in keys:
            cut = key.find(separator, len(prefix))
            short = key if cut < 0 else key[: cut + len(separator)]
            if not out or out[-1] != short:
                out.append(short)
        return out

    def index_for_key(self, key: str) -> int:
        entry = self.entries.get(key)
        return entry.modify_index if entry is not None else self.table_index

    def index_for_prefix(self, prefix: str) -> int:
        best = max((self.entries[k].modify_index for k in self._prefix_keys(prefix)), default=0)
        for key, index in self.tombstones.items():
            if index > best and key.startswith(prefix):
                best = index
        return best or self.table_index

    # --- planned writes --------------------------------------------------------------------------

    def plan_put(
        self, key: str, value: bytes, *, flags: int, cas: int | None, index: int
    ) -> Mutation:
        existing = self.entries.get(key)
        if cas is not None:
            if cas == 0 and existing is not None:
                return Mutation(result=False)
            if cas != 0 and (existing is None or existing.modify_index != cas):
                return Mutation(result=False)
        if existing is None:
            entry = KVEntry(key=key, value=value, flags=flags, create_index=index,
                            modify_index=index)
        else:
            entry = replace(existing, value=value, flags=flags, modify_index=index)
        return Mutation(index=index, ops=(Op("kv", key, entry),), result=True)

    def plan_lock(
        self, key: str, value: bytes, *, flags: int, session: str, index: int, now: float
    ) -> Mutation:
        """``?acquire=<session>`` (the session is known to exist): False when another session
        holds the key or the key is inside a lock delay."""
        existing = self.entries.get(key)
        if existing is not None and existing.session:
            if existing.session != session:
                return Mutation(result=False)
            entry = replace(existing, value=value, flags=flags, modify_index=index)
            return Mutation(index=index, ops=(Op("kv", key, entry),), result=True)
        if self.lock_delay.get(key, 0.0) > now:
            return Mutation(result=False)
        if existing is None:
            entry = KVEntry(key=key, value=value, flags=flags, lock_index=1, session=session,
                            create_index=index, modify_index=index)
        else:
            entry = replace(existing, value=value, flags=flags, session=session,
                            lock_index=existing.lock_index + 1, modify_index=index)
        return Mutation(index=index, ops=(Op("kv", key, entry),), result=True)

    def plan_unlock(
        self, key: str, value: bytes, *, flags: int, session: str, index: int
    ) -> Mutation:
        """``?release=<session>``: False unless ``session`` holds the key."""
        existing = self.entries.get(key)
        if existing is None or existing.session != session:
            return Mutation(result=False)
        entry = replace(existing, value=value, flags=flags, session="", modify_index=index)
        return Mutation(index=index, ops=(Op("kv", key, entry),), result=True)

    def plan_delete(self, key: str, *, recurse: bool, cas: int | None, index: int) -> Mutation:
        if recurse:
            keys = self._prefix_keys(key)
        else:
            existing = self.entries.get(key)
            if existing is None:
                return Mutation(result=True)
            if cas is not None and existing.modify_index != cas:
                return Mutation(result=False)
            keys = [key]
        if not keys:
            return Mutation(result=True)
        return Mutation(index=index, ops=tuple(Op("kv", k, None) for k in keys), result=True)

    # --- apply -----------------------------------------------------------------------------------

    def apply(self, op: Op, index: int) -> None:
        key = op.key
        old = self.entries.get(key)
        if old is not None and old.session:
            held = self.by_session.get(old.session)
            if held is not None:
                held.discard(key)
                if not held:
                    del self.by_session[old.session]
        if isinstance(op.value, KVEntry) and op.value.session:
            self.by_session.setdefault(op.value.session, set()).add(key)
        if op.value is None:
            if self.entries.pop(key, None) is not None:
                pos = bisect.bisect_left(self._sorted, key)
                del self._sorted[pos]
            self.tombstones[key] = index
        else:
            assert isinstance(op.value, KVEntry)
            if key not in self.entries:
                bisect.insort(self._sorted, key)
            self.entries[key] = op.value
            self.tombstones.pop(key, None)
        self.table_index = max(self.table_index, index)
