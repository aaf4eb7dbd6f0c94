"""The exit codes of every ``meshd`` command, in one table that the README, each command's
``--help`` epilog and ``meshd.cli.main`` share.

A script or a monitoring check tells three outcomes apart: the command worked (0), it worked and
the answer is "no" or the request was refused (1), it was called wrongly (2, argparse's own code),
and it could not get an answer at all (3: the admin API or the registry did not answer, or
answered something that is not what was asked for). 3 is Nagios' UNKNOWN: a check built on
``meshd status`` says "cannot tell", never "not ready", when it cannot reach the daemon.
"""

from __future__ import annotations

import textwrap

import httpx

from meshd.admin.client import AdminError

OK = 0
FAILED = 1         # a failed check (not ready, not routed), or refused: invalid file, conflict
USAGE = 2          # argparse's code for bad arguments; also options that cannot work together
UNREACHABLE = 3    # the admin API or registry cannot be reached or read
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

TABLE = (
    (OK, "success (status: ready; explain: the request reaches an app)"),
    (FAILED, "a failed check or a refusal (status: not ready: starting, stopping, or a local "
             "service whose health check is critical; explain: not routed or denied; "
             "an invalid file, a conflicting write, a refusal by the registry or the CA)"),
    (USAGE, "usage error: unknown command, bad or missing arguments, options that cannot "
            "work together"),
    (UNREACHABLE, "no answer: the admin API or the registry cannot be reached (no connection, "
                  "timeout, TLS refused) or did not answer with what was asked for"),
    (INTERRUPTED, "interrupted (Ctrl-C)"),
)


def epilog(*, title: str = "exit codes") -> str:
    """The table as a ``--help`` epilog (``meshd.cli.main`` adds it to every command)."""
    return f"{title}:\n" + "\n".join(
        textwrap.fill(text, width=92, initial_indent=f"  {code:<4}", subsequent_indent=" " * 6)
        for code, text in TABLE)


def code_for(error: BaseException) -> int:
    """The exit code of a command that ended with ``error`` (a ``MeshError``):
    ``UNREACHABLE`` when nothing usable answered, else ``FAILED``."""
    return UNREACHABLE if unreachable(error) else FAILED


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` is, or was raised from, a failure to reach a server: an admin API that
    could not be read, or an HTTP transport error (connect, timeout, TLS, protocol)."""
    seen: BaseException | None = error
    for _ in range(8):  # the chains meshd raises are short
        if seen is None:
            return False
        if isinstance(seen, AdminError | httpx.TransportError):
            return True
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return False
