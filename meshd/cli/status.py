"""``meshd status``: a one-screen summary of one meshd, read from its admin API's ``/v1/state``.

Exit status: 0 when the daemon is ready, 1 when it answers but is not ready, 2 when its admin API
cannot be reached, refuses this client, or answers something that is not a state document.
``render`` is pure: the state mapping in, the text out.

An admin API served over mutual TLS (``[admin] tls = true``) is read with ``--admin https://ADDR``
and an operator certificate: ``--ca`` (the mesh's ca.crt), ``--cert`` and ``--key``, as written
by ``meshd ca issue --operator NAME``. ``admin_ssl_context`` and ``admin_error`` are shared with
the console (``meshd tui``).
"""

from __future__ import annotations

import argparse
import ssl
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from meshd.errors import MeshError
from meshd.httpd import parse_hostport

DEFAULT_ADMIN = "127.0.0.1:15000"
CERT_WARN_SECONDS = 6 * 3600  # a 24 h leaf is renewed long before this; below it, say so
EXIT_READY, EXIT_NOT_READY, EXIT_UNREACHABLE = 0, 1, 2


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "status", help="one-screen summary of the local meshd",
        description="Print what the meshd behind ADMIN is doing: readiness, local services and "
        "their health, upstreams and their endpoints per subset, route generation, registry "
        "staleness and certificate expiry. Exit 0 if ready, 1 if not ready, 2 if unreachable "
        "or refused. An admin API served over TLS ([admin] tls = true) needs "
        "--admin https://ADDR and an operator certificate (meshd ca issue --operator NAME).",
    )
    p.add_argument("--admin", default=DEFAULT_ADMIN, metavar="ADDR",
                   help=f"the daemon's admin address HOST:PORT, or https://HOST:PORT for an "
                   f"admin API over TLS (default: {DEFAULT_ADMIN})")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                   help="how long to wait for an answer (default: 3)")
    p.add_argument("--ca", metavar="FILE",
                   help="over TLS: the mesh CA bundle to verify the admin API with (ca.crt)")
    p.add_argument("--cert", metavar="FILE",
                   help="over TLS: the operator certificate (PEM) to present")
    p.add_argument("--key", metavar="FILE", help="over TLS: the operator certificate's key")
    p.set_defaults(func=run)


def admin_ssl_context(ca: str | None, cert: str | None, key: str | None,
                      options: tuple[str, str, str] = ("--ca", "--cert", "--key"),
                      ) -> ssl.SSLContext:
    """A client context for admin APIs over mutual TLS: trust only the mesh CA ``ca``, present
    the operator certificate ``cert``/``key``. The admin API presents its node's certificate,
    whose name is a SPIFFE ID, not a host name: the chain is verified, the host name is not.
    ``options``: the command's names for the three, for its messages."""
    ca_opt, cert_opt, key_opt = options
    if not ca:
        raise MeshError(f"{ca_opt} FILE is needed over TLS: the mesh CA bundle (the ca.crt "
                        f"that `meshd ca issue --operator NAME` writes)")
    if key and not cert:
        raise MeshError(f"{key_opt} without {cert_opt}")
    try:
        context = ssl.create_default_context(cafile=ca)
        context.check_hostname = False
        if cert:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise MeshError(f"cannot load the admin TLS files: {exc}") from exc
    return context


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    for _ in range(8):  # the chain httpx -> httpcore -> anyio -> ssl is short
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def admin_error(exc: BaseException, *, tls: bool, client_cert: bool,
                options: tuple[str, str, str] = ("--ca", "--cert", "--key")) -> str:
    """Why an admin API could not be read, in an operator's words: a refusal with the server's
    reason, a certificate that cannot be verified, a handshake the server broke off."""
    ca_opt, cert_opt, key_opt = options
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        try:
            body = exc.response.json()
        except ValueError:
            body = None
        if code == 403 and isinstance(body, dict) and body.get("error"):
            return f"refused: {body.get('reason') or body['error']}"
        return f"HTTP {code}"
    failure = _ssl_error(exc)
    if isinstance(failure, ssl.SSLCertVerificationError):
        return (f"TLS: cannot verify the admin API's certificate ({failure.verify_message}): "
                f"is {ca_opt} this mesh's ca.crt?")
    if failure is not None:
        return f"TLS: {failure.reason or failure}"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or unreachable"
    if isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError | httpx.WriteError):
        if not tls:
            return (f"closed without an answer: is the admin API over TLS? then give "
                    f"{ca_opt}, {cert_opt}, {key_opt}")
        if not client_cert:
            return (f"TLS handshake broken off: an operator certificate is required "
                    f"({cert_opt}, {key_opt})")
        return ("TLS handshake broken off: is the certificate an operator's from this mesh's "
                "CA, and still valid?")
    return str(exc) or type(exc).__name__


def admin_url(raw: str, tls: bool) -> tuple[str, bool]:
    """``(base URL, over TLS)`` of ``HOST:PORT``, ``http://HOST:PORT`` or ``https://HOST:PORT``;
    without a scheme, HTTPS when TLS files were given."""
    scheme, _, rest = raw.rpartition("://")
    if scheme and scheme not in ("http", "https"):
        raise ValueError(f"unknown scheme {scheme}:// (http or https)")
    host, port = parse_hostport(rest.rstrip("/"))
    https = scheme == "https" if scheme else tls
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if https else 'http'}://{shown}:{port}", https


def run(args: argparse.Namespace) -> int:
    try:
        base, https = admin_url(args.admin, bool(args.ca or args.cert))
    except ValueError as exc:
        print(f"meshd status: --admin: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not https and (args.cert or args.key):
        print(f"meshd status: --cert/--key are for an admin API over TLS, but --admin "
              f"{args.admin} is plain HTTP", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        context = admin_ssl_context(args.ca, args.cert, args.key) if https else None
    except MeshError as exc:
        print(f"meshd status: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    url = f"{base}/v1/state"
    try:
        # trust_env=False: the admin API is on loopback, an HTTP(S)_PROXY must not see it
        with httpx.Client(timeout=args.timeout, trust_env=False,
                          verify=context if context is not None else True) as http:
            response = http.get(url)
        response.raise_for_status()
        state = response.json()
        if not isinstance(state, dict) or "ready" not in state:
            raise ValueError("the answer is not a meshd state document")
    except (httpx.HTTPError, ValueError) as exc:
        reason = admin_error(exc, tls=https, client_cert=bool(args.cert))
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 403:
            print(f"meshd status: {url}: {reason}", file=sys.stderr)
        elif isinstance(exc, httpx.ConnectError | httpx.TimeoutException) \
                and _ssl_error(exc) is None:
            print(f"meshd status: cannot read {url}: {reason} "
                  "(is meshd running, and is --admin its admin address?)", file=sys.stderr)
        else:
            print(f"meshd status: cannot read {url}: {reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(render(state), end="")
    return EXIT_READY if state.get("ready") is True else EXIT_NOT_READY


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


def render(state: Mapping[str, Any]) -> str:
    ready = state.get("ready") is True
    out = [
        f"meshd {state.get('node', '?')} ({state.get('address', '?')}), trust domain "
        f"{state.get('trust_domain', '?')}: {'READY' if ready else 'NOT READY'}",
        f"  up {duration(float(state.get('uptime_seconds', 0)))}, route generation "
        f"{state.get('generation', 0)}, meshd {state.get('version', '?')}, "
        f"pid {state.get('process', {}).get('pid', '?')}",
    ]
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

    registry = state.get("registry", {})
    stale = float(registry.get("staleness_seconds", 0.0))
    errors = [w for w in registry.get("watches", []) if w.get("error")]
    if stale > 0 or errors:
        detail = f": {errors[0]['name']}: {errors[0]['error']}" if errors else ""
        out.append(f"registry {registry.get('url', '?')}: STALE for {duration(stale)}, "
                   f"serving the last known view{detail}")
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

    if state.get("config_error"):
        first, *rest = str(state["config_error"]).splitlines()
        out.append(f"route table REJECTED (the previous one stays): {first}")
        out += [f"  {line}" for line in rest]
    return "\n".join(out) + "\n"
