"""What a route changes in a request or response it forwards, and the ``location`` of a
redirect it answers itself: header edits, path prefix and host rewrites. Pure.

Semantics:
- header edits (``HeaderEdits``): ``remove`` drops every header of a name, ``set`` replaces
  every header of its name by one, ``add`` appends one (keeping those already there);
- a prefix rewrite replaces the part of the path the route's prefix matched (``/api/`` ->
  ``/v2/`` turns ``/api/users?id=1`` into ``/v2/users?id=1``); one ``/`` is dropped where the
  new prefix ends with one and the rest starts with one (``/api`` -> ``/`` turns ``/api/users``
  into ``/users``, not ``//users``); the query string is kept;
- a host rewrite sets ``Host``;
- a redirect's ``location`` is the request's URL (``http``, its ``Host``, its path and query)
  with the redirect's parts put in; a new scheme without a new port drops the port (the new
  scheme's default), and a default port (80 for http, 443 for https) is never written.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from urllib.parse import urlsplit

from meshd.config.schema import HeaderEdits, Redirect
from meshd.proxy.core.http1 import Header

DEFAULT_PORTS = {"http": "80", "https": "443"}


@functools.lru_cache(maxsize=256)
def _encoded(edits: HeaderEdits) -> tuple[frozenset[bytes], tuple[Header, ...]]:
    """The names a set of edits drops (``remove`` and ``set``), and the headers it appends
    (``set``, then ``add``), as bytes (values are ASCII: ``meshd.config.route_edge``)."""
    dropped = frozenset(n.encode("ascii") for n in (*edits.remove, *(n for n, _ in edits.set)))
    appended = tuple((n.encode("ascii"), v.encode("ascii")) for n, v in (*edits.set, *edits.add))
    return dropped, appended


def edit_headers(headers: Iterable[Header], edits: HeaderEdits) -> list[Header]:
    """``headers`` with ``edits`` applied (module doc); names compared case-insensitively."""
    dropped, appended = _encoded(edits)
    kept = [(n, v) for n, v in headers if n.lower() not in dropped] if dropped else list(headers)
    kept.extend(appended)
    return kept


def rewrite_path(path: str, matched: str, new: str) -> str:
    """``path`` (which starts with ``matched``) with ``matched`` replaced by ``new``."""
    rest = path[len(matched):]
    if new.endswith("/") and rest.startswith("/"):
        rest = rest[1:]
    return new + rest


def rewrite_target(target: bytes, matched: str, new: str) -> bytes:
    """A request target (origin form: path and query) with its path's prefix rewritten."""
    path, sep, query = target.partition(b"?")
    return rewrite_path(path.decode("latin-1"), matched, new).encode("latin-1") + sep + query


def set_host(headers: Iterable[Header], host: str) -> list[Header]:
    """``headers`` with ``Host`` replaced by ``host`` (first, as a client writes it)."""
    return [(b"host", host.encode("ascii")), *((n, v) for n, v in headers
                                                 if n.lower() != b"host")]


def _split_authority(authority: str) -> tuple[str, str]:
    """``host[:port]`` (``[v6][:port]`` too) as (host, port); port ``""`` when none."""
    if authority.startswith("["):
        end = authority.find("]")
        if end != -1:
            rest = authority[end + 1:]
            return authority[:end + 1], rest[1:] if rest.startswith(":") else ""
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit():
        return host, port
    return authority, ""


def redirect_location(redirect: Redirect, target: str, host: str, matched: str | None,
                      scheme: str = "http") -> str:
    """Where ``redirect`` sends a request for ``target`` (origin or absolute form) with Host
    ``host`` that came in over ``scheme``; ``matched``: the route's path prefix (for a
    ``prefix`` redirect)."""
    if not target.startswith("/"):  # absolute form: the URL names its own host
        parts = urlsplit(target)
        scheme = parts.scheme or scheme
        host = parts.netloc or host
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    path, sep, query = target.partition("?")
    if redirect.path is not None:
        path = redirect.path
        if "?" in path:  # the redirect names its own query
            sep = query = ""
    elif redirect.prefix is not None and matched is not None and path.startswith(matched):
        path = rewrite_path(path, matched, redirect.prefix)
    new_scheme = redirect.scheme or scheme
    name, port = _split_authority(host)
    if redirect.host is not None:
        name = redirect.host
    if redirect.port is not None:
        port = str(redirect.port)
    elif new_scheme != scheme:
        port = ""
    if port == DEFAULT_PORTS.get(new_scheme):
        port = ""
    authority = f"{name}:{port}" if port else name
    return f"{new_scheme}://{authority}{path}{sep}{query}"
