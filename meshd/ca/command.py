"""``meshd ca init|token|issue|serve``: the operator's side of the CA.

stdout carries only what scripts consume (the fingerprint, the token, the listen URL); everything
else goes to the log on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import trio

from meshd.ca import files, issuer, server, store, tokens
from meshd.ca.spiffe import check_name
from meshd.config import durations as config_durations
from meshd.errors import CAError
from meshd.httpd import parse_hostport

log = logging.getLogger(__name__)


def parse_duration(text: str) -> timedelta:
    """Go-style duration (``30s``, ``10m``, ``1h30m``, ``1.5h``) -> timedelta; ValueError if
    malformed or not positive."""
    seconds = config_durations.parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return timedelta(seconds=seconds)


def _duration_arg(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _services_arg(text: str) -> list[str]:
    try:
        names = [check_name(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not names:
        raise argparse.ArgumentTypeError("at least one service is required")
    return names


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def register(subparsers: Any) -> None:
    ca = subparsers.add_parser("ca", help="the mesh certificate authority")
    sub = ca.add_subparsers(dest="ca_command", metavar="CA_COMMAND", required=True)

    p = sub.add_parser("init", help="create a root key and certificate")
    p.add_argument("--dir", required=True, type=Path, help="CA directory (created 0700)")
    p.add_argument("--trust-domain", required=True, help="SPIFFE trust domain, e.g. mesh.local")
    p.add_argument("--leaf-ttl", type=_duration_arg, default=issuer.DEFAULT_LEAF_LIFETIME,
                   help="lifetime of issued service certificates (default 24h)")
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("token", help="mint a join token for a node (printed on stdout)")
    p.add_argument("--dir", required=True, type=Path, help="CA directory")
    p.add_argument("--node", required=True, help="node name the token is bound to")
    p.add_argument("--services", required=True, type=_services_arg,
                   help="comma-separated services the node may claim")
    p.add_argument("--ttl", type=_duration_arg, default=timedelta(hours=1),
                   help="validity, e.g. 30m, 1h, 24h (default 1h)")
    p.add_argument("--uses", type=_positive_int, default=None,
                   help="number of joins allowed (default: unlimited within the ttl)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("issue", help="issue a service certificate offline")
    p.add_argument("--dir", required=True, type=Path, help="CA directory")
    p.add_argument("--service", required=True, help="service name")
    p.add_argument("--out", required=True, type=Path,
                   help="directory for NAME.crt, NAME.key and ca.crt")
    p.add_argument("--ttl", type=_duration_arg, default=None,
                   help="lifetime (default: the CA's leaf lifetime)")
    p.set_defaults(func=cmd_issue)

    p = sub.add_parser("serve", help="run the CA's HTTPS API")
    p.add_argument("--dir", required=True, type=Path, help="CA directory")
    p.add_argument("--listen", required=True, help="HOST:PORT, e.g. 127.0.0.1:8443")
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="extra DNS name or IP for the API's certificate (repeatable)")
    p.set_defaults(func=cmd_serve)


def cmd_init(args: argparse.Namespace) -> int:
    material = store.init_ca(
        args.dir, args.trust_domain, now=datetime.now(UTC), leaf_lifetime=args.leaf_ttl,
        force=args.force,
    )
    log.info("created CA for trust domain %s in %s", material.trust_domain, args.dir)
    print(material.fingerprint)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    store.load_ca(args.dir)  # refuse to mint tokens for a directory that holds no CA
    token, record = store.TokenStore(args.dir).mint(
        args.node, args.services, now=datetime.now(UTC), ttl=args.ttl, uses=args.uses
    )
    log.info(
        "join token %s for node %s, services %s, expires %s, uses %s",
        record.token_id, record.node, ",".join(record.services),
        tokens.format_time(record.expires_at),
        "unlimited" if record.uses_left is None else record.uses_left,
    )
    print(token)
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    try:
        service = check_name(args.service)
    except ValueError as exc:
        raise CAError(str(exc)) from None
    material = store.load_ca(args.dir)
    key = issuer.new_private_key()
    cert = issuer.issue_leaf(
        material.signer, key.public_key(), service=service,
        trust_domain=material.trust_domain, now=datetime.now(UTC),
        lifetime=args.ttl or material.settings.leaf_lifetime,
    )
    try:
        out = files.ensure_private_dir(args.out)
        files.write_private_file(out / f"{service}.key", issuer.private_key_pem(key))
        files.write_public_file(out / f"{service}.crt", issuer.cert_pem(cert))
        files.write_public_file(
            out / files.BUNDLE_FILE, b"".join(issuer.cert_pem(c) for c in material.roots())
        )
    except OSError as exc:
        raise CAError(f"cannot write to {args.out}: {exc}") from exc
    log.info(
        "issued certificate for %s (serial %s) valid until %s into %s",
        service, issuer.serial_hex(cert), cert.not_valid_after_utc.isoformat(), args.out,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        host, port = parse_hostport(args.listen)
    except ValueError as exc:
        raise CAError(str(exc)) from None
    return trio.run(partial(_serve, args.dir, host, port, args.san))


async def _serve(directory: Path, host: str, port: int, extra_hosts: list[str]) -> int:
    failure: CAError | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                endpoint = await nursery.start(
                    partial(server.serve_ca, directory, host, port, extra_hosts=extra_hosts)
                )
            except CAError as exc:
                failure = exc  # re-raised below, outside the nursery (no exception group)
            else:
                print(f"listening on {endpoint.url}", flush=True)
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return 0

