"""``meshd ca init|token|issue|revoke|rotate|serve``: the operator's side of the CA.

stdout carries only what scripts consume (the fingerprint, the token, the listen URL); everything
else goes to stderr: the log, and for ``init`` the sentence saying where the fingerprint goes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import trio

from meshd import systemd, timestamps
from meshd.ca import issuer, operations, server, store
from meshd.cli import exits
from meshd.cli.limits import add_limit_flags, limits_from_args
from meshd.config import durations as config_durations
from meshd.config.schema import ListenerLimits
from meshd.conns.fdlimit import raise_nofile_limit
from meshd.errors import CAError
from meshd.httpd import parse_hostport
from meshd.identity import keys
from meshd.identity.spiffe import Kind, check_name, spiffe_id_of

log = logging.getLogger(__name__)

DEFAULT_FINISH_TIMEOUT = timedelta(minutes=5)
DEFAULT_RENEW_SPREAD = timedelta(seconds=30)
FINISH_POLL = 1.0  # seconds between two looks at the ledger while --finish waits


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

    p = sub.add_parser(
        "init", help="create a root key and certificate",
        description="Create the mesh's root key (0600) and certificate in DIR. stdout carries "
        "only the root's fingerprint (sha256:...), for scripts; every host pins it as "
        "fingerprint in the [ca] table of its meshd.toml, and stderr says so.")
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
    p.add_argument("--uses", type=_positive_int, default=1,
                   help="number of joins allowed within the ttl (default 1: a joined node "
                        "renews with its node certificate and never needs the token again)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("issue", help="issue a service or operator certificate offline")
    p.add_argument("--dir", required=True, type=Path, help="CA directory")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--service", help="service name (spiffe://TD/svc/NAME)")
    who.add_argument("--operator", help="operator name (spiffe://TD/operator/NAME, client "
                                        "auth only: signs the route table (`meshd routes`), "
                                        "reads admin APIs served over mutual TLS)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="directory for NAME.crt, NAME.key and ca.crt")
    p.add_argument("--ttl", type=_duration_arg, default=None,
                   help="lifetime (default: the CA's leaf lifetime)")
    p.set_defaults(func=cmd_issue)

    p = sub.add_parser("revoke", help="revoke a node (and stop its renewals) or one certificate")
    p.add_argument("--dir", required=True, type=Path, help="CA directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--node", help="node name: every live certificate of it, and renewals")
    which.add_argument("--serial", help="serial number (hex) of one certificate")
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser("rotate", help="start a root rotation (new root, certified by the old "
                                      "one), or --finish it")
    p.add_argument("--dir", required=True, type=Path, help="CA directory")
    p.add_argument("--finish", action="store_true",
                   help="ask every node still on the previous root to renew now, wait until "
                        "they have, then drop the previous root (refused while a live "
                        "certificate needs it)")
    p.add_argument("--timeout", type=_duration_arg, default=None,
                   help="with --finish: how long to wait for the nodes' renewals (default 5m); "
                        "then exit 1 naming the nodes that have not renewed")
    p.add_argument("--spread", type=_duration_arg, default=None,
                   help="with --finish: each node renews at a random point within this "
                        "(default 30s), so that a large fleet does not reach the CA at once")
    p.set_defaults(func=cmd_rotate)

    p = sub.add_parser("serve", help="run the CA's HTTPS API")
    p.add_argument("--dir", required=True, type=Path, help="CA directory")
    p.add_argument("--listen", required=True, help="HOST:PORT, e.g. 127.0.0.1:8443")
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="extra DNS name or IP for the API's certificate (repeatable)")
    add_limit_flags(p, server.DEFAULT_LIMITS)
    p.set_defaults(func=cmd_serve)


def cmd_init(args: argparse.Namespace) -> int:
    material = store.init_ca(
        args.dir, args.trust_domain, now=datetime.now(UTC), leaf_lifetime=args.leaf_ttl,
        force=args.force,
    )
    log.info("created CA for trust domain %s in %s", material.trust_domain, args.dir)
    print(material.fingerprint, flush=True)
    print(fingerprint_sentence(material.fingerprint), file=sys.stderr)
    return 0


def fingerprint_sentence(fingerprint: str) -> str:
    """What ``meshd ca init`` tells the operator (on stderr) about the fingerprint it printed."""
    return ("meshd ca init: the root's fingerprint is above; every host pins it: put it in each "
            "host's meshd.toml as\n"
            f'  [ca]\n  fingerprint = "{fingerprint}"')


def cmd_token(args: argparse.Namespace) -> int:
    store.load_ca(args.dir)  # refuse to mint tokens for a directory that holds no CA
    token, record = store.TokenStore(args.dir).mint(
        args.node, args.services, now=datetime.now(UTC), ttl=args.ttl, uses=args.uses
    )
    log.info(
        "join token %s for node %s, services %s, expires %s, uses %s",
        record.token_id, record.node, ",".join(record.services),
        timestamps.format_time(record.expires_at),
        "unlimited" if record.uses_left is None else record.uses_left,
    )
    print(token)
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    kind, name = (Kind.OPERATOR, args.operator) if args.operator else (Kind.SERVICE, args.service)
    issued = operations.issue_to_directory(args.dir, kind, name, args.out,
                                           now=datetime.now(UTC), lifetime=args.ttl)
    log.info(
        "issued certificate for %s (serial %s) valid until %s into %s",
        spiffe_id_of(issued.trust_domain, kind, name), keys.serial_hex(issued.certificate),
        issued.certificate.not_valid_after_utc.isoformat(), args.out,
    )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    store.load_ca(args.dir)
    done = operations.revoke(args.dir, now=datetime.now(UTC), node=args.node, serial=args.serial)
    what = f"node {args.node}" if args.node else f"serial {args.serial}"
    log.info("revoked %s: %d live certificate(s) on the deny list%s", what, len(done),
             "; its renewals are refused" if args.node else "")
    for revocation in done:
        print(revocation.serial)
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    if not args.finish and (args.timeout is not None or args.spread is not None):
        print("meshd ca rotate: --timeout and --spread go with --finish", file=sys.stderr)
        return exits.USAGE
    if args.finish:
        wait_for_renewals(args.dir, timeout=args.timeout or DEFAULT_FINISH_TIMEOUT,
                          spread=args.spread or DEFAULT_RENEW_SPREAD)
        material = operations.finish_rotation(args.dir, now=datetime.now(UTC))
        log.info("root rotation finished: only %s is trusted now; hosts drop the previous root "
                 "within seconds. New joins need ca.fingerprint = %s in meshd.toml",
                 material.fingerprint, material.fingerprint)
    else:
        material = operations.rotate_ca(args.dir, now=now)
        log.info("root rotation started: %s signs from now on, %s stays trusted; hosts trust "
                 "both within seconds. Then run `meshd ca rotate --finish`: it asks every host "
                 "to renew onto the new root now and retires the previous one once they have",
                 material.fingerprint, material.previous_fingerprint)
    print(material.fingerprint)
    return 0


def wait_for_renewals(directory: Path, *, timeout: timedelta, spread: timedelta) -> None:
    """``--finish``'s first half: ask the nodes still on the previous root to renew now (the
    CA's running API tells each at its next deny-list poll) and wait, logging progress, until
    none is left. Raises CAError naming the nodes left when ``timeout`` passes."""
    now = datetime.now(UTC)
    progress = operations.rotation_progress(directory, now=now)
    if not progress.waiting:
        return
    material = store.load_ca(directory)
    operations.ask_renewal(directory, now=now, root=material.previous_fingerprint,
                           spread=spread)
    log.info("asked %d node(s) still on the previous root to renew now (each within %s); "
             "waiting up to %s: %s", len(progress.waiting), _short(spread), _short(timeout),
             progress.summary())
    deadline = time.monotonic() + timeout.total_seconds()
    shown = progress
    while progress.waiting and time.monotonic() < deadline:
        time.sleep(min(FINISH_POLL, max(deadline - time.monotonic(), 0.0)))
        progress = operations.rotation_progress(directory, now=datetime.now(UTC))
        if progress != shown:
            log.info("%s", progress.summary())
            shown = progress
    if progress.waiting:
        raise CAError(
            f"{len(progress.waiting)} of {len(progress.nodes)} node(s) have not renewed onto the "
            f"new root within {_short(timeout)}: {', '.join(progress.waiting)}. Is `meshd ca "
            "serve` running, and can those hosts reach it? The request stays in force: a host "
            "that comes back renews within seconds; run `meshd ca rotate --finish` again then, "
            "or remove a host for good with `meshd ca revoke --node NAME`")
    log.info("every node renewed onto the new root: %s", progress.summary())


def _short(duration: timedelta) -> str:
    return f"{duration.total_seconds():g}s"


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        host, port = parse_hostport(args.listen)
    except ValueError as exc:
        raise CAError(str(exc)) from None
    limits = limits_from_args(args)
    raise_nofile_limit()
    return trio.run(partial(_serve, args.dir, host, port, args.san, limits))


async def _serve(directory: Path, host: str, port: int, extra_hosts: list[str],
                 limits: ListenerLimits) -> int:
    failure: CAError | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                endpoint = await nursery.start(
                    partial(server.serve_ca, directory, host, port, extra_hosts=extra_hosts,
                            limits=limits)
                )
            except CAError as exc:
                failure = exc  # re-raised below, outside the nursery (no exception group)
            else:
                print(f"listening on {endpoint.url}", flush=True)
                systemd.notify(ready=True, status=f"serving the CA API on {endpoint.url}")
                nursery.start_soon(systemd.watchdog_task)
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    systemd.notify(stopping=True, status="stopping")
                    break
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return 0

