"""A route's edge features in ``routes.toml`` (see ``meshd.config.routes``): ``rate_limit``,
``request_headers``/``response_headers``, ``rewrite`` and ``redirect``, parsed with the file's
``Reader`` and turned back into canonical data. Pure.

What is refused, with its key path: a header edit on a hop-by-hop header, on meshd's own
(``x-meshd-*``, and on requests the per-hop ``x-request-id``/``traceparent``), on ``host``
(``rewrite.host`` says that) or on ``content-length``; a value with a control character
(CR, LF, NUL...) or outside printable ASCII; a prefix rewrite or redirect on a route without
a path prefix match; a redirect together with what only a forwarded request uses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from meshd.config.reader import Reader
from meshd.config.route_parts import get_integer, get_number, get_table
from meshd.config.schema import (
    RATE_LIMIT_HEADER,
    RATE_LIMIT_SOURCE,
    REDIRECT_STATUSES,
    HeaderEdits,
    MatchKind,
    RateLimit,
    Redirect,
    Rewrite,
    RouteMatch,
)

RATE_LIMIT_KEYS = {"requests_per_second", "burst", "key"}
HEADER_EDIT_KEYS = {"add", "set", "remove"}
REWRITE_KEYS = {"prefix", "host"}
REDIRECT_KEYS = {"status", "scheme", "host", "port", "path", "prefix"}
# what a redirect route never does: it is answered by meshd, nothing is forwarded
NOT_WITH_REDIRECT = ("split", "timeout", "retries", "fault", "mirror", "rewrite",
                     "request_headers")
MAX_RATE = 1e6
MAX_BURST = 1_000_000_000
MAX_HEADER_VALUE = 8192

_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token (header names)
_VALUE_RE = re.compile(r"^[\t\x20-\x7e]*$")  # printable ASCII and tab: no CR, LF, NUL
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"^({_LABEL}(\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])$")
_HOST_PORT_RE = re.compile(rf"^({_LABEL}(\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(:[0-9]{{1,5}})?$")
_PATH_RE = re.compile(r"^/[\x21-\x7e]*$")  # no blanks, no control characters

# headers only meshd writes, or that carry a message's framing or connection
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-authenticate",
                        "proxy-authorization"})
_PER_HOP_IDS = frozenset({"x-request-id", "traceparent"})


# -- rate_limit ---------------------------------------------------------------------------------

def parse_rate_limit(r: Reader, raw: Mapping[str, Any], path: str) -> RateLimit | None:
    """``rate_limit = { requests_per_second = 100, burst = 200, key = "source" }``."""
    found = get_table(r, raw, "rate_limit", path, RATE_LIMIT_KEYS)
    if found is None:
        return None
    table, lpath = found
    if "requests_per_second" not in table:
        r.problem(f"{lpath}.requests_per_second", "required key is missing")
        return None
    rate = get_number(r, table, "requests_per_second", lpath, 0, MAX_RATE, None)
    if rate is not None and rate <= 0:
        r.problem(f"{lpath}.requests_per_second", "must be greater than zero")
        rate = None
    burst = get_integer(r, table, "burst", lpath, 1, MAX_BURST, None)
    key = _limit_key(r, table, lpath)
    if rate is None or ("burst" in table and burst is None) or key is None:
        return None
    return RateLimit(rate, burst if burst is not None else max(1, math.ceil(rate)), key)


def _limit_key(r: Reader, raw: Mapping[str, Any], path: str) -> str | None:
    key: str | None = r.get(raw, "key", path, str, "")
    if key is None or key in ("", RATE_LIMIT_SOURCE):
        return key
    name = key[len(RATE_LIMIT_HEADER):] if key.startswith(RATE_LIMIT_HEADER) else ""
    if not _TOKEN_RE.match(name):
        r.problem(f"{path}.key", f'expected "source" or "header:NAME", got {key!r}')
        return None
    return RATE_LIMIT_HEADER + name.lower()


def rate_limit_data(limit: RateLimit) -> dict[str, Any]:
    out: dict[str, Any] = {"requests_per_second": limit.requests_per_second,
                           "burst": limit.burst}
    if limit.key:
        out["key"] = limit.key
    return out


# -- request_headers / response_headers --------------------------------------------------------

def parse_header_edits(r: Reader, raw: Mapping[str, Any], key: str,
                       path: str) -> HeaderEdits | None:
    """``request_headers`` or ``response_headers`` (``key``):
    ``{ add = {..}, set = {..}, remove = [..] }``."""
    found = get_table(r, raw, key, path, HEADER_EDIT_KEYS)
    if found is None:
        return None
    table, hpath = found
    request = key == "request_headers"
    before = len(r.problems)
    if not any(k in table for k in HEADER_EDIT_KEYS):
        r.problem(hpath, "expected add, set or remove (or leave it out)")
    seen: dict[str, str] = {}
    edits: dict[str, list[tuple[str, str]]] = {}
    for kind in ("add", "set"):
        values = r.get(table, kind, hpath, dict, {}) or {}
        edits[kind] = []
        for name, value in values.items():
            where = f"{hpath}.{kind}.{name}"
            lower = _header_name(r, name, where, request, seen, kind)
            if lower is None:
                continue
            if not isinstance(value, str):
                r.problem(where, f"expected a string, got {type(value).__name__}")
            elif len(value) > MAX_HEADER_VALUE:
                r.problem(where, f"value longer than {MAX_HEADER_VALUE} characters")
            elif not _VALUE_RE.match(value):
                r.problem(where, "invalid value: printable ASCII only (no CR, LF, NUL or "
                          "other control characters)")
            else:
                edits[kind].append((lower, value))
    removed: list[str] = []
    listed = r.get(table, "remove", hpath, list, []) or []
    for name in listed:
        where = f"{hpath}.remove"
        if not isinstance(name, str):
            r.problem(where, f"expected header names, got {name!r}")
            continue
        lower = _header_name(r, name, where, request, seen, "remove")
        if lower is not None:
            removed.append(lower)
    if len(r.problems) != before:
        return None
    return HeaderEdits(tuple(edits["add"]), tuple(edits["set"]), tuple(removed))


def _header_name(r: Reader, name: str, where: str, request: bool, seen: dict[str, str],
                 kind: str) -> str | None:
    """``name`` in lower case, or None after reporting why it cannot be edited."""
    lower = name.lower()
    reason = None
    if not _TOKEN_RE.match(name):
        reason = f"invalid header name {name!r}"
    elif lower in HOP_BY_HOP or lower == "content-length":
        reason = f"{lower!r} is hop-by-hop or framing: meshd writes it, it cannot be edited"
    elif lower.startswith("x-meshd-"):
        reason = f"{lower!r} is meshd's own header: it cannot be edited"
    elif lower == "host":
        reason = "'host' cannot be edited here: use rewrite = { host = \"...\" }"
    elif request and lower in _PER_HOP_IDS:
        reason = f"{lower!r} is set by meshd on every hop: it cannot be edited"
    elif lower in seen:
        reason = (f"{lower!r} appears twice" if seen[lower] == kind
                  else f"{lower!r} is in both {seen[lower]} and {kind}")
    if reason is not None:
        r.problem(where, reason)
        return None
    seen[lower] = kind
    return lower


def header_edits_data(edits: HeaderEdits) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if edits.add:
        out["add"] = dict(edits.add)
    if edits.set:
        out["set"] = dict(edits.set)
    if edits.remove:
        out["remove"] = list(edits.remove)
    return out


# -- rewrite ------------------------------------------------------------------------------------

def parse_rewrite(r: Reader, raw: Mapping[str, Any], path: str,
                  match: RouteMatch) -> Rewrite | None:
    """``rewrite = { prefix = "/v2/", host = "api.internal" }`` (a prefix rewrite needs the
    route to match a path prefix)."""
    found = get_table(r, raw, "rewrite", path, REWRITE_KEYS)
    if found is None:
        return None
    table, wpath = found
    before = len(r.problems)
    if "prefix" not in table and "host" not in table:
        r.problem(wpath, "expected prefix or host (or both)")
    prefix = _path(r, table, "prefix", wpath)
    if "prefix" in table:
        _needs_prefix_match(r, match, f"{wpath}.prefix", "a prefix rewrite")
    host = _host(r, table, "host", wpath, _HOST_PORT_RE, "a host name or address, with an "
                 "optional :port")
    if len(r.problems) != before:
        return None
    return Rewrite(prefix, host)


def rewrite_data(rewrite: Rewrite) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rewrite.prefix is not None:
        out["prefix"] = rewrite.prefix
    if rewrite.host is not None:
        out["host"] = rewrite.host
    return out


# -- redirect -----------------------------------------------------------------------------------

def parse_redirect(r: Reader, raw: Mapping[str, Any], path: str,
                   match: RouteMatch) -> Redirect | None:
    """``redirect = { status = 301, scheme = "https", host = "...", port = 443, path = "/..." }``
    (or ``prefix`` in place of ``path``, on a route matching a path prefix). A route with a
    redirect has none of ``NOT_WITH_REDIRECT``."""
    found = get_table(r, raw, "redirect", path, REDIRECT_KEYS)
    if found is None:
        return None
    table, dpath = found
    before = len(r.problems)
    status = r.get(table, "status", dpath, int, 301)
    if status is not None and status not in REDIRECT_STATUSES:
        r.problem(f"{dpath}.status", f"must be one of {', '.join(map(str, REDIRECT_STATUSES))}, "
                  f"got {status}")
    scheme = r.choice(table, "scheme", dpath, str, ["http", "https"], None)
    host = _host(r, table, "host", dpath, _HOST_RE, "a host name or address (the port is "
                 "port = N)")
    port = r.port(table, "port", dpath, None)
    new_path = _path(r, table, "path", dpath)
    prefix = _path(r, table, "prefix", dpath)
    if "path" in table and "prefix" in table:
        r.problem(dpath, "path and prefix both given: path replaces the whole path, prefix "
                  "only the matched prefix (choose one)")
    if "prefix" in table:
        _needs_prefix_match(r, match, f"{dpath}.prefix", "a prefix redirect")
    if not any(k in table for k in ("scheme", "host", "port", "path", "prefix")):
        r.problem(dpath, "expected scheme, host, port, path or prefix: a redirect to the same "
                  "URL would loop")
    conflicts = [k for k in NOT_WITH_REDIRECT if k in raw]
    if conflicts:
        r.problem(dpath, f"cannot be combined with {', '.join(conflicts)}: a redirect is "
                  "answered by meshd, nothing is forwarded (remove one or the other)")
    if len(r.problems) != before or status is None:
        return None
    return Redirect(status, scheme, host, port, new_path, prefix)


def redirect_data(redirect: Redirect) -> dict[str, Any]:
    out: dict[str, Any] = {"status": redirect.status}
    for key in ("scheme", "host", "port", "path", "prefix"):
        value = getattr(redirect, key)
        if value is not None:
            out[key] = value
    return out


# -- shared -------------------------------------------------------------------------------------

def _path(r: Reader, raw: Mapping[str, Any], key: str, path: str) -> str | None:
    value = r.get(raw, key, path, str, None)
    if value is not None and not _PATH_RE.match(value):
        r.problem(f"{path}.{key}", f"invalid path {value!r}: it starts with '/' and has no "
                  "blanks or control characters")
        return None
    return value  # type: ignore[no-any-return]


def _host(r: Reader, raw: Mapping[str, Any], key: str, path: str, pattern: re.Pattern[str],
          expected: str) -> str | None:
    value = r.get(raw, key, path, str, None)
    if value is not None and not pattern.match(value):
        r.problem(f"{path}.{key}", f"invalid host {value!r} (expected {expected})")
        return None
    return value  # type: ignore[no-any-return]


def _needs_prefix_match(r: Reader, match: RouteMatch, where: str, what: str) -> None:
    if match.path is None or match.path.kind is not MatchKind.PREFIX:
        r.problem(where, f"{what} needs the route to match a path prefix "
                  '(match = { path = { prefix = "/..." } })')
