"""On-disk durability for the embedded registry: a snapshot plus an append-only write-ahead log.

Layout of ``--data-dir``::

    LOCK           flock'ed while a registry uses the directory
    snapshot.json  one framed record: the whole state and its indexes (written to a temporary
                   file, fsynced, renamed over the old one, directory fsynced)
    wal.log        framed records, one per acknowledged write: {"index": N, "ops": [...]}

A framed record is ``<crc32 as 8 hex digits> <json>\\n``. Each write is appended and fdatasync'ed
before the registry applies it or answers (the server holds one lock from the plan to the
answer, so concurrent writes and compaction queue behind it), so an acknowledged write survives
``kill -9`` and a power cut. When durability becomes uncertain (fdatasync failed: the kernel may
have dropped the pages it could not write, and a later fsync would not say so; a failed write
could not be rolled back; a compaction's rename could not be made durable), the data directory
refuses every further write until the registry is restarted and recovers from what is on disk:
a write is never acknowledged on the strength of a log in an unknown state.

On load, an incomplete last line is cut off with a warning that says what was cut (its offset,
size and the index it carried when readable) and the last index kept. What it cannot say is
whether that write had been acknowledged: a crash of the registry or its host mid-append leaves
such a tail for a write that was never acknowledged, but a file cut by something else (a copy or
restore that lost its end, a disk or filesystem fault) may have lost acknowledged writes, and a
cut that falls exactly between records leaves no trace at all in the file. The warning says both.
Any other defect (bad checksum, bad JSON, index going backwards) stops the start-up with the file
name and the reason — a corrupt file is never silently emptied.

When the log passes ``compact_bytes`` the state is written as a new snapshot and the log starts
empty; log records at or below the snapshot's index are skipped on load, so a crash between the
two steps is harmless.

The blocking calls here run in a worker thread (the shell uses ``trio.to_thread``); this module
imports no trio.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd.errors import RegistryError
from meshd.fileio import fsync_dir, write_atomic
from meshd.registry.embedded.state import RegistryState
from meshd.registry.embedded.store.records import Mutation, op_from_json, op_to_json

log = logging.getLogger(__name__)

SNAPSHOT = "snapshot.json"
WAL = "wal.log"
LOCK = "LOCK"
FORMAT = 1
DEFAULT_COMPACT_BYTES = 16 * 1024 * 1024


class CorruptDataError(RegistryError):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"corrupt registry data file {path}: {reason}")
        self.path = path
        self.reason = reason


def frame(obj: Any) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def unframe(line: bytes) -> Any:
    """The JSON of one framed record (without its newline); ValueError says what is wrong."""
    if len(line) < 10 or line[8:9] != b" ":
        raise ValueError("record is not '<crc32> <json>'")
    try:
        expected = int(line[:8], 16)
    except ValueError:
        raise ValueError("record checksum is not hexadecimal") from None
    body = line[9:]
    if zlib.crc32(body) != expected:
        raise ValueError("checksum mismatch")
    return json.loads(body)


@dataclass(frozen=True)
class DroppedTail:
    """An incomplete last record cut off the log at load."""

    offset: int  # where it began in the file
    size: int  # its bytes (without a newline: it was never completed)
    index: int | None  # the index it carried, when its beginning is readable
    last_index_kept: int  # the registry's index after the records kept

    def describe(self, path: Path) -> str:
        carried = (f"carrying index {self.index}" if self.index is not None
                   else "its index unreadable")
        return (f"{path}: dropped an incomplete last record ({self.size} bytes at offset "
                f"{self.offset}, {carried}); the data now ends at index {self.last_index_kept}. "
                "If the registry or its host crashed while writing it, that write was never "
                "acknowledged. If the file was cut by something else (a copy or restore that "
                "lost its end, a disk or filesystem fault), it may have been acknowledged, and "
                "whole records after it may be gone too: compare with the index clients last "
                "saw (X-Consul-Index)")


_TAIL_INDEX = re.compile(rb'^[0-9a-f]{8} \{"index":([0-9]+)[,}]')


@dataclass
class Loaded:
    """What a data directory held: replayed into ``state``."""

    state: RegistryState
    records_replayed: int
    dropped_tail: DroppedTail | None

    @property
    def truncated_tail(self) -> bool:
        return self.dropped_tail is not None


class DataDir:
    """One registry data directory. Use ``DataDir.open`` and then ``load``."""

    def __init__(self, path: Path, compact_bytes: int) -> None:
        self.path = path
        self.compact_bytes = compact_bytes
        self._lock_fd = -1
        self._wal_fd = -1
        self.wal_size = 0
        self.broken = ""  # why durability is uncertain: every write is refused ("" when fine)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, compact_bytes: int = DEFAULT_COMPACT_BYTES
             ) -> DataDir:
        root = Path(path)
        try:
            root.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RegistryError(f"cannot use data directory {root}: {exc.strerror}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            raise RegistryError(
                f"data directory {root} is in use by another registry process"
            ) from exc
        self = cls(root, compact_bytes)
        self._lock_fd = lock_fd
        return self

    def close(self) -> None:
        for fd in (self._wal_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._wal_fd = self._lock_fd = -1

    # --- loading ---------------------------------------------------------------------------------

    def load(self, state: RegistryState) -> Loaded:
        """Fill an empty ``state`` from the snapshot and the log; opens the log for appending."""
        snap_path = self.path / SNAPSHOT
        if snap_path.exists():
            self._load_snapshot(snap_path, state)
        wal_path = self.path / WAL
        replayed, dropped = 0, None
        if wal_path.exists():
            replayed, dropped = self._replay_wal(wal_path, state)
        try:
            self._wal_fd = os.open(wal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self.wal_size = os.fstat(self._wal_fd).st_size
            fsync_dir(self.path)
        except OSError as exc:
            raise RegistryError(f"cannot open {wal_path}: {exc.strerror}") from exc
        return Loaded(state, replayed, dropped)

    def _load_snapshot(self, path: Path, state: RegistryState) -> None:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise RegistryError(f"cannot read {path}: {exc.strerror}") from exc
        if not raw.endswith(b"\n"):
            raise CorruptDataError(path, "file is truncated (no final newline)")
        try:
            data = unframe(raw[:-1])
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"unknown snapshot format {data.get('format')!r}"
                                 if isinstance(data, dict) else "snapshot is not an object")
            ops = [op_from_json(item) for item in data["records"]]
            state.restore(ops, data["indexes"])
        except (ValueError, KeyError, TypeError, RegistryError) as exc:
            raise CorruptDataError(path, str(exc)) from exc

    def _replay_wal(self, path: Path, state: RegistryState) -> tuple[int, DroppedTail | None]:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise RegistryError(f"cannot read {path}: {exc.strerror}") from exc
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        replayed = 0
        for number, line in enumerate(lines, start=1):
            try:
                data = unframe(line)
                index = int(data["index"])
                ops = tuple(op_from_json(item) for item in data["ops"])
            except (ValueError, KeyError, TypeError, RegistryError) as exc:
                raise CorruptDataError(path, f"line {number}: {exc}") from exc
            if index <= state.index:
                continue  # already in the snapshot
            try:
                state.apply(Mutation(index=index, ops=ops))
            except RegistryError as exc:
                raise CorruptDataError(path, f"line {number}: {exc}") from exc
            replayed += 1
        if not tail:
            return replayed, None
        match = _TAIL_INDEX.match(tail)
        dropped = DroppedTail(offset=len(raw) - len(tail), size=len(tail),
                              index=int(match.group(1)) if match else None,
                              last_index_kept=state.index)
        log.warning("%s", dropped.describe(path))
        try:
            os.truncate(path, dropped.offset)
        except OSError as exc:
            raise RegistryError(f"cannot truncate {path}: {exc.strerror}") from exc
        return replayed, dropped

    # --- writing (blocking: call from a worker thread) -------------------------------------------

    def append(self, mutation: Mutation) -> None:
        """Append one write to the log and flush it to disk; only then may it be applied and
        acknowledged. RegistryError when it is not durable (nothing may be acknowledged)."""
        self._check_usable()
        record = frame({"index": mutation.index, "ops": [op_to_json(op) for op in mutation.ops]})
        before = self.wal_size
        wal = self.path / WAL
        try:
            written = 0
            while written < len(record):
                written += os.write(self._wal_fd, record[written:])
        except OSError as exc:
            # Leave no half record behind: the next append would follow it and make the log
            # unreadable.
            try:
                os.ftruncate(self._wal_fd, before)
            except OSError as undo:
                self._break(f"a failed append to {wal} could not be rolled back: {undo}")
            raise RegistryError(f"cannot write {wal}: {exc.strerror}") from exc
        try:
            os.fdatasync(self._wal_fd)
        except OSError as exc:
            # After a failed fdatasync the kernel may have dropped the pages it could not write
            # and a later fdatasync would succeed without them: nothing in this log can be
            # vouched for any more, so no later write may be acknowledged on it.
            self._break(f"fdatasync of {wal} failed: {exc.strerror}")
            raise RegistryError(f"cannot make {wal} durable: {exc.strerror}") from exc
        self.wal_size = before + len(record)

    def _break(self, reason: str) -> None:
        self.broken = reason
        log.error("registry data in %s: %s; refusing every write until the registry is "
                  "restarted (it then recovers from what is on disk)", self.path, reason)

    def _check_usable(self) -> None:
        if self.broken:
            raise RegistryError(f"registry data in {self.path} refuses writes: {self.broken}; "
                                "restart the registry")

    def needs_compaction(self) -> bool:
        return self.wal_size >= self.compact_bytes

    @staticmethod
    def snapshot_bytes(state: RegistryState) -> bytes:
        """Serialise the state (do this on the event loop, while no write is in flight)."""
        return frame({
            "format": FORMAT,
            "records": [op_to_json(op) for op in state.records()],
            "indexes": state.indexes(),
        })

    def compact(self, snapshot: bytes) -> None:
        """Install ``snapshot`` and start an empty log. Before the rename nothing changed
        (a failure leaves the old log in use, the snapshot's records skipped at load); after
        it, the new log is the one appended to, so no write can go to the replaced file."""
        self._check_usable()
        wal_tmp = self.path / (WAL + ".tmp")
        try:
            write_atomic(self.path / SNAPSHOT, snapshot, 0o600)
            # the new log stays open as the log, so it is not written with write_atomic
            fd = os.open(wal_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        except OSError as exc:
            raise RegistryError(f"cannot compact {self.path}: {exc.strerror}") from exc
        try:
            os.fsync(fd)
            os.replace(wal_tmp, self.path / WAL)
        except OSError as exc:
            os.close(fd)
            raise RegistryError(f"cannot compact {self.path}: {exc.strerror}") from exc
        os.close(self._wal_fd)
        self._wal_fd, self.wal_size = fd, 0
        try:
            fsync_dir(self.path)
        except OSError as exc:
            # the rename may not survive a crash: writes appended to the new log could vanish
            self._break(f"the compaction's rename in {self.path} could not be made durable: "
                        f"{exc.strerror}")
            raise RegistryError(f"cannot compact {self.path}: {exc.strerror}") from exc
        log.info("compacted registry data in %s (snapshot %d bytes)", self.path, len(snapshot))
