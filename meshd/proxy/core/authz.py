"""Inbound authorization: may this caller make this request of this destination? Pure.

The rules come from the destination's ``[destinations.X.authorization]`` in the route table in
force (``meshd.config.schema.Authorization``); the inbound side asks ``authorize`` for every
HTTP request and every TCP connection, and again for each open TCP connection whenever the
route table changes, so a rule taken away also cuts what it used to let in.

Paths are compared in a normal form (``normalize_path``): percent-decoded, ``//`` merged,
``.``/``..`` resolved, without the query. A rule on ``/admin*`` then also catches
``/%61dmin`` and ``/public/../admin``, which most apps would serve as ``/admin``.

A TCP connection has no path or method: a rule with ``paths`` or ``methods`` never applies to
it (so it falls through to the next rule, and to the default deny).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from meshd.config.schema import ANY_SOURCE, Authorization, AuthorizationRule, AuthzAction

DEFAULT_DENY = "default deny"


@dataclass(frozen=True, slots=True)
class Verdict:
    """``rule`` names the rule that decided (``DEFAULT_DENY`` when none applied; "" when the
    destination has no rules at all)."""

    allowed: bool
    rule: str


ALLOW_ALL = Verdict(True, "")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the calling service (from its certificate), or, on a permissive service's
    plaintext connection, nobody known (``authenticated=False``)."""

    service: str
    authenticated: bool = True


def authorize(authorization: Authorization | None, caller: Caller, method: str | None = None,
              path: str | None = None) -> Verdict:
    """The verdict on a request (``method`` and ``path`` given; ``path`` already normalised)
    or a TCP connection (neither given)."""
    if authorization is None:
        return ALLOW_ALL
    for rule in authorization.rules:
        if _applies(rule, caller, method, path):
            return Verdict(rule.action is AuthzAction.ALLOW, rule.name)
    return Verdict(False, DEFAULT_DENY)


def _applies(rule: AuthorizationRule, caller: Caller, method: str | None,
             path: str | None) -> bool:
    if rule.sources and not (caller.authenticated and (
            caller.service in rule.sources or ANY_SOURCE in rule.sources)):
        return False
    if rule.methods and (method is None or method not in rule.methods):
        return False
    if not rule.paths:
        return True
    return path is not None and any(_path_matches(p, path) for p in rule.paths)


def _path_matches(pattern: str, path: str) -> bool:
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    return path == pattern


def normalize_path(target: bytes) -> str:
    """The path of a request target as rules see it (see the module comment). An absolute-form
    target (``http://host/p``) gives its path; ``*`` (OPTIONS) stays ``*``."""
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    if path == b"*":
        return "*"
    if not path.startswith(b"/"):
        scheme_end = path.find(b"://")
        if scheme_end >= 0:
            slash = path.find(b"/", scheme_end + 3)
            path = path[slash:] if slash >= 0 else b"/"
        else:
            path = b"/" + path
    decoded = unquote_to_bytes(path).decode("utf-8", "replace").replace("\\", "/")
    out: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    trailing = "/" if decoded.endswith(("/", "/.", "/..")) and out else ""
    return "/" + "/".join(out) + trailing
