"""The file-descriptor limit: raised at start, and the connections it leaves room for.

Each connection a daemon accepts is a descriptor, and a proxied one holds a second towards the
app or the next hop. The usual soft limit of 1024 is spent by some 500 idle clients; then
``accept`` fails with EMFILE and every new client waits, whoever it is. So the daemons raise
the soft limit to the hard one at start (systemd units set both with ``LimitNOFILE=``), and
their connection caps are kept under what that limit can hold (``connection_budget``): the caps
decide which connection is refused, not EMFILE.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# descriptors kept aside from connections: listening sockets, pooled and health-check
# connections, registry watches, files, the log
RESERVED = 1024
UNLIMITED = 1 << 20  # what an "unlimited" limit is taken to mean (the kernel's nr_open default)


def _finite(value: int) -> int:
    return UNLIMITED if value == resource.RLIM_INFINITY else value


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit (before, after)
    and log it once. A refusal (a sandbox that forbids ``setrlimit``) is logged and
    leaves the limit as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else UNLIMITED
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, target, exc)
            return _finite(soft), _finite(soft)
        log.info("open file limit raised from %d to %d", soft, target)
        return _finite(soft), target
    log.debug("open file limit is %d (its hard limit)", _finite(soft))
    return _finite(soft), _finite(soft)


def connection_budget(soft_limit: int | None = None) -> int:
    """How many accepted connections a process may hold at once under ``soft_limit`` (the
    current soft RLIMIT_NOFILE when None): two descriptors each, after ``RESERVED`` (a quarter
    of a small limit). Pure given ``soft_limit``."""
    if soft_limit is None:
        soft_limit = _finite(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    reserved = min(RESERVED, soft_limit // 4)
    return max(1, (soft_limit - reserved) // 2)
