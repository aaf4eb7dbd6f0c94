"""Handing freed memory back to the system after a flood of connections.

CPython frees a connection's objects into its own arenas and into the C allocator; glibc's
allocator keeps most of what it got from the kernel (only the top of the main heap shrinks on
its own), so a process that held thousands of connections once keeps their memory for good.
``malloc_trim(0)`` makes glibc release every whole free page, from every arena, with
``madvise``. Other C libraries (musl, macOS) have no ``malloc_trim``: there this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def can_trim() -> bool:
    """Whether this process's C library can hand free memory back (glibc)."""
    return _malloc_trim() is not None


def collect_cycles() -> int:
    """Free what only reference cycles keep alive (a closed connection's exception and its
    frames, say), so that the trim after it finds those pages free. Holds the interpreter:
    call it from the event loop's thread, once per flood."""
    return gc.collect()


def trim() -> bool:
    """Release the C allocator's free pages to the system (blocking, without the GIL: fine in
    a worker thread). False where there is no ``malloc_trim``."""
    function = _malloc_trim()
    if function is None:
        return False
    function(0)
    return True
