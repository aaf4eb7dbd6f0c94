"""Regular expressions that come from config files or clients, run in linear time. Pure.

A pattern an operator writes in routes.toml is tried against every request's path and headers on
the event loop, and a pattern a client sends in a registry ``?filter=`` runs inside the registry:
with a backtracking engine (Python's ``re``) one pattern such as ``(a+)+`` can take seconds on a
short input and stall every other request in that process. Such patterns are compiled with RE2
(``google-re2``), which matches in time linear in the input and refuses what it cannot do in
linear time (back-references, look-around) when the pattern is compiled, never at match time.
RE2's syntax is also Go's ``regexp``, which is what Consul's filter ``matches`` speaks.

Patterns written into meshd's own code (a fixed grammar, known to be safe) keep using ``re``.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Protocol

# RE2 builds an automaton per pattern; this bounds its memory (RE2's own default is 8 MiB). A
# pattern that needs more is refused when compiled, with RE2's reason.
MAX_PROGRAM_MEMORY = 8 << 20
MAX_PATTERN_LENGTH = 4096


class PatternError(ValueError):
    """A pattern RE2 will not compile; ``str(exc)`` is the reason, fit for an operator."""


class Pattern(Protocol):
    """What callers use of a compiled pattern (the subset shared with ``re.Pattern``)."""

    @property
    def pattern(self) -> str: ...

    def fullmatch(self, text: str) -> object | None: ...

    def search(self, text: str) -> object | None: ...


@cache
def _re2() -> tuple[Any, Any]:
    """The RE2 module and its options, loaded with the first pattern: a process whose routes
    have none (most workers) never maps the library (about 2.5 MB)."""
    import re2

    options = re2.Options()
    options.max_mem = MAX_PROGRAM_MEMORY
    options.log_errors = False  # RE2 would print every refused pattern on stderr
    return re2, options


def compile_pattern(text: str) -> Pattern:
    """Compile ``text`` with RE2, or raise ``PatternError`` saying why not."""
    if len(text) > MAX_PATTERN_LENGTH:
        raise PatternError(f"pattern is {len(text)} characters long, at most "
                           f"{MAX_PATTERN_LENGTH} are allowed")
    re2, options = _re2()
    try:
        compiled: Pattern = re2.compile(text, options)
    except re2.error as exc:
        raise PatternError(_reason(exc)) from None
    return compiled


def _reason(exc: Exception) -> str:
    detail = exc.args[0] if exc.args else ""
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", "replace")
    return str(detail) or "not a valid RE2 pattern"
