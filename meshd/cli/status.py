"""``meshd status``: a one-screen summary of one meshd, read from its admin API's ``/v1/state``.

Exit status (``meshd.cli.exits``): 0 when the daemon is ready, 1 when it answers but is not ready
(``/v1/state``'s ``ready``, the same verdict as ``/readyz``: starting, stopping, or a local
service whose health check is critical; the reasons are printed), 2 for options that cannot
work, 3 when its admin API cannot be reached, refuses this client, or answers something that
is not a state document. ``render`` and ``status_document`` are pure: the state mapping in, the
text or the ``-o json`` document out.

An admin API served over mutual TLS (``[admin] tls = true``) is read with ``--admin https://ADDR``
and an operator certificate: ``--ca`` (the mesh's ca.crt), ``--cert`` and ``--key``, as written
by ``meshd ca issue --operator NAME``. The admin API is read through the one admin client
(``meshd.admin.client``), as ``meshd explain`` and the console read it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from meshd.admin.client import AdminError
from meshd.cli import exits
from meshd.cli.admin_api import (
    add_admin_options,
    admin_base,
    demo_hint,
    failure_line,
    read_state,
    signer_line,
)
from meshd.cli.output import add_output_option, print_json, wants_json
from meshd.errors import MeshError

CERT_WARN_SECONDS = 6 * 3600  # a 24 h leaf is renewed long before this; below it, say so
EXIT_READY, EXIT_NOT_READY, EXIT_UNREACHABLE = exits.OK, exits.FAILED, exits.UNREACHABLE
STATUS_FORMAT = "meshd.status/1"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "status", help="one-screen summary of the local meshd",
        description="Print what the meshd behind ADMIN is doing: readiness, local services and "
        "their health, upstreams and their endpoints per subset, route generation, registry "
        "staleness, certificate expiry, and a refused reload or changes waiting for a restart. "
        "Exit 0 if ready, 1 if not ready (starting, stopping, or a local service whose health "
        "check is critical: the reasons are printed), 3 if its admin "
        "API is unreachable or refuses this client. An admin API served over TLS ([admin] "
        "tls = true) needs --admin https://ADDR and an operator certificate (meshd ca issue "
        "--operator NAME). With -o json: one object {format, admin, reachable, ready, "
        "exit_code, error, state}, where state is the daemon's /v1/state as it served it "
        "(null when unreachable) and error is null or {failure, message, hint}.",
    )
    add_admin_options(p, timeout_help="how long to wait for an answer (default: 3)")
    add_output_option(p, what="the daemon's /v1/state and the verdict")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        base, _ = admin_base(args)
        state = read_state(args, required=("ready",))
    except AdminError as exc:
        hint = demo_hint("meshd status", exc)
        print(f"meshd status: {failure_line(exc)}", file=sys.stderr)
        if hint:
            print(f"meshd status: {hint}", file=sys.stderr)
        if wants_json(args):
            print_json(unreachable_document(exc, hint), sys.stdout)
        return EXIT_UNREACHABLE
    except MeshError as exc:  # options that cannot work: nothing was asked
        print(f"meshd status: {exc}", file=sys.stderr)
        return exits.USAGE
    code = EXIT_READY if state.get("ready") is True else EXIT_NOT_READY
    if wants_json(args):
        print_json(status_document(base, state, code), sys.stdout)
    else:
        print(render(state), end="")
    return code


def status_document(admin: str, state: Mapping[str, Any], code: int) -> dict[str, Any]:
    """``-o json`` of a daemon that answered: the verdict, and ``/v1/state`` passed through
    whole (fields a newer daemon adds appear without a change here)."""
    return {"format": STATUS_FORMAT, "admin": admin, "reachable": True,
            "ready": state.get("ready") is True, "exit_code": code, "error": None,
            "state": dict(state)}


def unreachable_document(exc: AdminError, hint: str | None) -> dict[str, Any]:
    return {"format": STATUS_FORMAT, "admin": exc.url.removesuffix("/v1/state"),
            "reachable": False, "ready": None, "exit_code": EXIT_UNREACHABLE,
            "error": {"failure": exc.failure.name.lower(), "message": failure_line(exc),
                      "hint": hint},
            "state": None}


# -- rendering (pure) --------------------------------------------------------------------------

def duration(seconds: float) -> str:
    """``42s``, ``5m07s``, ``3h02m``, ``2d04h``: short, and exact enough for an operator."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))] if rows else []
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _subset_lines(name: str, state: Mapping[str, Any]) -> list[str]:
    """A destination's endpoints, grouped by the subsets its route declares (with the split's
    weights), else by version."""
    dest = state.get("destinations", {}).get(name)
    endpoints: list[Mapping[str, Any]] = list(dest.get("endpoints", [])) if dest else []
    route = state.get("routes", {}).get("destinations", {}).get(name, {})
    subsets: dict[str, str] = {k: v.get("version", "")
                               for k, v in route.get("subsets", {}).items()}
    split: dict[str, int] = route.get("split", {})
    if not subsets:
        subsets = {e.get("version", "?"): e.get("version", "?") for e in endpoints}
    if dest is None:
        return ["no endpoint view yet (waiting for the registry)"]
    if not subsets:
        return ["no endpoints registered"]
    lines = []
    for subset, version in sorted(subsets.items()):
        members = [e for e in endpoints if e.get("version") == version]
        healthy = [e for e in members if e.get("healthy")]
        weight = f" {split[subset]}%" if subset in split else ""
        nodes = ", ".join(sorted({str(e.get("node")) for e in healthy}))
        lines.append(f"{subset}{weight}: {len(healthy)}/{len(members)} healthy"
                     + (f" ({nodes})" if nodes else ""))
    return lines


def _reload_lines(reload: Mapping[str, Any] | None) -> list[str]:
    """The last reload of meshd.toml: refused (with its problems), and whatever it left
    waiting for a restart (key, values, why)."""
    if not reload:
        return []
    out = []
    if reload.get("result") == "refused":
        problems = list(reload.get("problems", []))
        out.append(f"reload REFUSED at {reload.get('at', '?')}: {len(problems)} problem(s) in "
                   f"{reload.get('file', '?')}, still running on the previous configuration")
        out += [f"  {p}" for p in problems]
    failed = list(reload.get("failed", []))
    if failed:
        out.append(f"reload at {reload.get('at', '?')} COULD NOT APPLY {len(failed)} change(s) "
                   f"in {reload.get('file', '?')} (left out of the configuration in force)")
        out += [f"  {c.get('key')}: {c.get('old')} -> {c.get('new')}: {c.get('reason', '')}"
                for c in failed]
    restart = list(reload.get("needs_restart", []))
    if restart:
        out.append(f"RESTART NEEDED: {len(restart)} change(s) in {reload.get('file', '?')} "
                   "wait for `systemctl restart meshd` (the running values stay)")
        out += [f"  {c.get('key')}: {c.get('old')} -> {c.get('new')} ({c.get('reason', '')})"
                for c in restart]
    return out


def _workers_line(workers: list[Mapping[str, Any]]) -> str:
    """``  workers: 2 (pids 11, 12), 1 restarted, 1 not ready``."""
    pids = ", ".join(str(w.get("pid", "?")) for w in workers)
    line = f"  workers: {len(workers)} (pids {pids})"
    restarts = sum(int(w.get("restarts", 0)) for w in workers)
    if restarts:
        line += f", {restarts} restarted"
    down = sum(1 for w in workers if not w.get("ready"))
    if down:
        line += f", {down} not ready"
    return line


def render(state: Mapping[str, Any]) -> str:
    ready = state.get("ready") is True
    out = [
        f"meshd {state.get('node', '?')} ({state.get('address', '?')}), trust domain "
        f"{state.get('trust_domain', '?')}: {'READY' if ready else 'NOT READY'}",
        f"  up {duration(float(state.get('uptime_seconds', 0)))}, route generation "
        f"{state.get('generation', 0)}, meshd {state.get('version', '?')}, "
        f"pid {state.get('process', {}).get('pid', '?')}",
    ]
    workers = state.get("process", {}).get("workers")
    if workers:
        out.append(_workers_line(workers))
    out += [f"  not ready: {reason}" for reason in state.get("not_ready", [])]
    if not ready and state.get("daemon_ready") is True:
        out.append("  (meshd itself is ready: this host's outbound traffic is forwarded)")
    inbound = state.get("inbound")
    if inbound:
        out.append(f"  inbound mTLS on {inbound.get('address')}:{inbound.get('port')}")

    services = state.get("services", [])
    out.append(f"services ({len(services)})")
    out += _table([[s["name"], s.get("version", ""), s.get("protocol", ""),
                    f"{s.get('address')}:{s.get('port')}", s.get("health", "unknown"),
                    s.get("health_output", "")] for s in services]) or ["  (none)"]

    upstreams = state.get("upstreams", [])
    out.append(f"upstreams ({len(upstreams)})")
    if not upstreams:
        out.append("  (none)")
    for u in upstreams:
        out.append(f"  {u['service']} -> {u['destination']} at "
                   f"{u.get('local_address')}:{u.get('local_port')}")
        out += [f"      {line}" for line in _subset_lines(u["destination"], state)]

    for g in state.get("gateways") or []:  # only hosts that run one get these lines
        listeners = ", ".join(f"{x.get('protocol')}://{x.get('address')}:{x.get('port')}"
                              for x in g.get("listeners", []))
        out.append(f"gateway {g.get('name')} ({g.get('health', 'unknown')}) on {listeners}")
        for r in g.get("routes", []):
            hosts = ",".join(r.get("hosts", [])) or "*"
            out.append(f"  {hosts}{r.get('path_prefix', '/')} -> {r.get('service')}")
            out += [f"      {line}" for line in _subset_lines(r.get("service", ""), state)]

    registry = state.get("registry", {})
    stale = float(registry.get("staleness_seconds", 0.0))
    watches = registry.get("watches", [])
    errors = [w for w in watches if w.get("error")]
    if registry.get("stale") is True or stale > 0 or errors:
        error = registry.get("contact_error") or (
            f"{errors[0]['name']}: {errors[0]['error']}" if errors else "")
        from_disk = " from disk" if any(w.get("source") == "disk" for w in watches) else ""
        out.append(f"registry {registry.get('url', '?')}: STALE for {duration(stale)}, "
                   f"serving the last known view{from_disk}" + (f": {error}" if error else ""))
        if registry.get("registered") is False:
            out.append("  local services not registered yet (retrying until it answers)")
    else:
        out.append(f"registry {registry.get('url', '?')}: up to date "
                   f"({len(registry.get('watches', []))} watches)")

    certs = state.get("certificates", [])
    out.append(f"certificates ({len(certs)})")
    if not certs:
        out.append("  (none yet: not joined to the CA)")
    rows = []
    for c in certs:
        left = float(c.get("expires_in_seconds", 0))
        if left <= 0:
            note = "EXPIRED"
        elif left < CERT_WARN_SECONDS:
            note = f"EXPIRES SOON, in {duration(left)}"
        else:
            note = f"in {duration(left)}"
        rows.append([c.get("spiffe_id", c.get("service", "?")),
                     f"expires {c.get('not_after', '?')}", note])
    out += _table(rows) if rows else []

    out.append(signer_line(state))
    out += _reload_lines(state.get("reload"))
    if state.get("config_error"):
        first, *rest = str(state["config_error"]).splitlines()
        out.append(f"route table REJECTED (the previous one stays): {first}")
        out += [f"  {line}" for line in rest]
    return "\n".join(out) + "\n"
