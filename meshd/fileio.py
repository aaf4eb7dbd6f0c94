"""Crash-safe file replacement, shared by the CA's key files and the registry's snapshots.

``write_atomic`` writes to a temporary file in the same directory (created 0600 by ``mkstemp``,
so a private file is never readable by others, not even for a moment), fsyncs it, renames it over
the target and fsyncs the directory: after a crash the path holds either the old content or the
new, never a mix. Blocking; raises OSError.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_MKSTEMP_MODE = 0o600


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``, file mode ``mode``; a failure leaves no temporary file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != _MKSTEMP_MODE:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(target.parent)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the entries of ``directory`` (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
