"""The ledger's certificates on disk: ``issued.jsonl``, one JSON line per certificate issued.

Appended to under the CA's lock (a renewal costs its own lines, not a rewrite of the fleet's),
read incrementally (a process reads only the lines appended since it last looked), compacted now
and then (expired records dropped, the file replaced atomically; readers notice the new inode and
read it whole). Blocking.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

from meshd.ca import ledger
from meshd.ca.ledger import IssuedRecord, Ledger
from meshd.errors import CAError
from meshd.identity.files import write_private_file

log = logging.getLogger(__name__)

COMPACT_SLACK = 1024  # lines appended between compaction checks, and dead lines tolerated


class IssuedJournal:
    """The certificates of the ledger, read from ``issued.jsonl`` incrementally: a process keeps
    what it read and reads only the lines appended since (a compaction, which replaces the file,
    makes it read the whole file again). Thread-safe; blocking."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._inode: int | None = None
        self._offset = 0
        self.lines = 0
        self.records: dict[str, IssuedRecord] = {}
        self._since_check = 0

    def read(self) -> dict[str, IssuedRecord]:
        """Every record so far: a shared dict that later reads update; copy it with ``dict()``
        before iterating or editing."""
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                self._inode, self._offset, self.lines, self.records = None, 0, 0, {}
                return self.records
            if st.st_ino != self._inode or st.st_size < self._offset:
                self._inode, self._offset, self.lines, self.records = st.st_ino, 0, 0, {}
            if st.st_size > self._offset:
                with self.path.open("rb") as f:
                    f.seek(self._offset)
                    data = f.read(st.st_size - self._offset)
                end = data.rfind(b"\n") + 1  # a line being appended is read next time
                try:
                    parsed = [ledger.issued_from_json(json.loads(line))
                              for line in data[:end].splitlines() if line.strip()]
                except (ValueError, KeyError, TypeError) as exc:
                    raise CAError(f"corrupt certificate journal {self.path}: {exc}") from exc
                # in place: readers copy it with dict(), which holds the GIL throughout
                self.records.update((r.serial, r) for r in parsed)
                self.lines += len(parsed)
                self._offset += end
            return self.records

    def append(self, records: list[IssuedRecord]) -> None:
        """Append and fsync (the caller holds the CA's lock). Raises OSError."""
        if not records:
            return
        data = "".join(json.dumps(ledger.issued_to_json(r), separators=(",", ":")) + "\n"
                       for r in records).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def maybe_compact(self, state: Ledger, appended: int) -> None:
        """Every ``COMPACT_SLACK`` lines appended by this process: drop expired records from
        ``state`` and, if more than half of the journal is dead, replace it by the live records
        (atomic). Amortised: a renewal does not pay for a pass over the fleet. Raises OSError."""
        self._since_check += appended
        if self._since_check < COMPACT_SLACK:
            return
        self._since_check = 0
        ledger.prune(state, datetime.now(UTC))
        if self.lines <= 2 * len(state.issued) + COMPACT_SLACK:
            return
        data = "".join(json.dumps(ledger.issued_to_json(r), separators=(",", ":")) + "\n"
                       for r in state.issued.values()).encode()
        write_private_file(self.path, data)
        log.info("certificate journal compacted: %d live record(s) of %d", len(state.issued),
                 self.lines)
