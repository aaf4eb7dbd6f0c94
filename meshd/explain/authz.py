"""The authorization part of ``meshd explain``: would the destination's meshd let the request in?
Pure.

Authorization is enforced on the inbound side, by the destination's own meshd, with the
``[destinations.NAME.authorization]`` rules of the route table in force. That table is the same
on every host, so the asked host's ``/v1/state`` knows the destination's rules. The verdict is
the proxy's own ``meshd.proxy.core.authz.authorize`` called as ``InboundContext.authorize``
calls it:
the caller's service name (from its certificate: a caller through the mesh is always
authenticated), the method as sent, and the path in the rules' normal form (``normalize_path``).
To show which rules apply, each one is also put to ``authorize`` on its own, as a one-rule table.
The request judged is an HTTP one: on a TCP connection rules with ``paths`` or ``methods`` never
apply (``meshd.proxy.core.authz``).

The caller is ``--source``, or else the one local service of the asked host that declares the
destination as an upstream. With none or several there is no verdict, unless the destination has
no rules: then every caller is let in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshd.config.schema import (
    ANY_SOURCE,
    Authorization,
    AuthorizationRule,
    AuthzAction,
    RouteTable,
)
from meshd.identity.spiffe import spiffe_id_for
from meshd.proxy.core.authz import DEFAULT_DENY, Caller, Verdict, authorize, normalize_path
from meshd.proxy.core.matcher import RequestFacts


@dataclass(frozen=True)
class RuleCheck:
    rule: AuthorizationRule
    applies: bool | None  # None: not tried (an earlier rule decided, or no caller known)


@dataclass(frozen=True)
class AuthzCheck:
    destination: str
    source: str | None  # None: no caller known, so no verdict (unless there are no rules)
    source_note: str  # how the caller was chosen, or why there is none
    spiffe_id: str  # the caller's identity as the destination sees it ("" if not known)
    method: str
    target: str  # as given
    path: str  # as the rules see it
    rules: tuple[RuleCheck, ...] | None  # None: no rules, default allow; (): default deny
    verdict: Verdict | None

    @property
    def denied(self) -> bool:
        return self.verdict is not None and not self.verdict.allowed


def choose_source(state: Mapping[str, Any], service: str,
                  given: str | None) -> tuple[str | None, str]:
    """The calling service (``given``, or the one local service calling ``service``) and a note
    on how it was chosen, or why there is none."""
    node = state.get("node") or "the asked host"
    callers = sorted({str(u.get("service")) for u in state.get("upstreams") or ()
                      if isinstance(u, Mapping) and u.get("destination") == service})
    if given is not None:
        if given in callers:
            return given, "from --source"
        return given, (f"from --source; it does not call {service} from {node}, and the "
                       "verdict is the same from any host")
    if len(callers) == 1:
        return callers[0], f"the one local service of {node} with {service} as an upstream"
    if not callers:
        return None, f"no local service of {node} has {service} as an upstream"
    return None, f"local services of {node} calling {service}: {', '.join(callers)}"


def check_authorization(table: RouteTable, service: str, facts: RequestFacts,
                        source: str | None, source_note: str,
                        trust_domain: str = "") -> AuthzCheck:
    """The verdict of ``service``'s rules (or the table's default policy) on ``facts`` sent by
    ``source``."""
    authorization = table.authorization_for(service)
    path = normalize_path(facts.target.encode("utf-8", "surrogateescape"))
    spiffe_id = _spiffe_id(trust_domain, source)

    def result(rules: tuple[RuleCheck, ...] | None, verdict: Verdict | None) -> AuthzCheck:
        return AuthzCheck(service, source, source_note, spiffe_id, facts.method, facts.target,
                          path, rules, verdict)

    if authorization is None:
        return result(None, authorize(None, Caller(source or "")))
    if source is None:
        return result(tuple(RuleCheck(rule, None) for rule in authorization.rules), None)
    caller = Caller(source)
    verdict = authorize(authorization, caller, facts.method, path)
    checks: list[RuleCheck] = []
    decided = False
    for rule in authorization.rules:
        applies = None if decided else (
            authorize(Authorization((rule,)), caller, facts.method, path).rule == rule.name)
        decided = decided or bool(applies)
        checks.append(RuleCheck(rule, applies))
    return result(tuple(checks), verdict)


def _spiffe_id(trust_domain: str, source: str | None) -> str:
    if source is None or not trust_domain:
        return ""
    try:
        return spiffe_id_for(trust_domain, source)
    except ValueError:
        return ""


def _describe(rule: AuthorizationRule) -> str:
    parts = [rule.action.value]
    if rule.sources:
        parts.append("from " + ", ".join(
            "any mesh service" if s == ANY_SOURCE else s for s in rule.sources))
    else:
        parts.append("from anyone")
    if rule.methods:
        parts.append("methods " + ", ".join(rule.methods))
    if rule.paths:
        parts.append("paths " + ", ".join(rule.paths))
    return " ".join(parts)


def _verdict_text(verdict: Verdict) -> str:
    if verdict.rule == DEFAULT_DENY:
        return "DENIED by the default deny (no rule applies)"
    if not verdict.rule:
        return "ALLOWED (no rules)"
    return f"{'ALLOWED' if verdict.allowed else 'DENIED'} by rule {verdict.rule!r}"


def render_authz(c: AuthzCheck) -> list[str]:
    """The "authorization" section of ``meshd explain``'s output."""
    if c.rules is None:
        return [f"authorization: {c.destination} has no rules and the mesh's default_policy is "
                "allow: its meshd lets every caller in"]
    if not c.rules:
        return [f"authorization: {c.destination} has no rules and the mesh's default_policy is "
                f"deny: its meshd refuses every caller (403)"]
    out = [f"authorization of {c.destination}, enforced by its own meshd (first rule that "
           "applies decides, else deny):"]
    for i, check in enumerate(c.rules, 1):
        if check.applies is None:
            state = "" if c.verdict is None else ": not reached"
        elif check.applies:
            allows = check.rule.action is AuthzAction.ALLOW
            state = f": APPLIES, {'allowed' if allows else 'denied'}"
        else:
            state = ": does not apply"
        out.append(f"  {i}. {check.rule.name}: {_describe(check.rule)}{state}")
    if c.verdict is None:
        out.append(f"verdict: unknown, no caller ({c.source_note}): pass --source SERVICE")
        return out
    identity = f" ({c.spiffe_id})" if c.spiffe_id else ""
    out.append(f"caller: {c.source}{identity}, {c.source_note}")
    given_path = c.target.partition("?")[0]
    seen_as = f" (the rules see the path {c.path})" if c.path != given_path else ""
    answer = "" if c.verdict.allowed else f": the meshd of {c.destination} answers 403"
    out.append(f"verdict: {c.method} {c.target}{seen_as} {_verdict_text(c.verdict)}{answer}")
    return out
