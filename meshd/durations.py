"""Go duration strings (``"1m30s"``, ``"250ms"``, ``"-1.5h"``, ``"0"``): one grammar for the mesh.

Go's ``time.ParseDuration`` and ``Duration.String()`` are the reference, because Consul speaks
them on its HTTP API and operators write them in meshd's own files. The entry points with their
callers' rules and error texts are thin wrappers around this module: ``meshd.config.durations``
(what operators may write: no sign, ValueError) and ``meshd.registry.embedded.store.decode``
(Consul's
``Request decode failed`` texts, JSON numbers as nanoseconds). Pure.
"""

from __future__ import annotations

import re

_UNITS = {
    "ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0,
    "m": 60.0, "h": 3600.0,
}
# Go allows "1." and ".5" and both micro signs (U+00B5, U+03BC); the plain form (meshd's own
# files) keeps the narrower grammar they have always had: digits on both sides of a point, U+00B5.
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_PLAIN_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|\u00b5s|ms|s|m|h)")


def parse_go_duration(text: str, *, plain: bool = False) -> float | None:
    """Seconds for a Go duration string (``"1m30s"``, ``"100ms"``, ``"-1s"``, ``"0"``), None if
    ``text`` is not one (no surrounding blanks allowed).

    ``plain=True`` accepts only the narrower form meshd's own files use: no sign, a decimal
    point with digits on both sides (``"1.5s"``, not ``"1.s"`` or ``".5s"``), ``µs`` only with
    the micro sign U+00B5.
    """
    s = text
    sign = 1.0
    if s[:1] in ("+", "-"):
        if plain:
            return None
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        return None
    part = _PLAIN_PART if plain else _GO_PART
    total = 0.0
    pos = 0
    while pos < len(s):
        m = part.match(s, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def format_go_duration(seconds: float) -> str:
    """Go's ``Duration.String()``: ``10s``, ``1m30s``, ``100ms``, ``1h0m0s``, ``0s``."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("\u00b5s", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _trim(ns / size) + unit
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    secs = _trim(rest / 1e9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}"
    if minutes:
        return f"{sign}{minutes}m{secs}"
    return sign + secs


def format_short_duration(seconds: float) -> str:
    """The shortest readable duration for a file a person reads (``90`` -> ``"90s"``, ``3600``
    -> ``"1h"``, ``0.25`` -> ``"250ms"``); ``parse_go_duration`` reads every output back."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds < 1 and seconds != 0:
        ms = seconds * 1000
        return f"{ms:g}ms"
    return f"{seconds:g}s"


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"
