"""The options of the commands that read a meshd's admin API (``meshd status``, ``meshd
explain``): ``--admin``, ``--timeout`` and, for an admin API over mutual TLS, an operator
certificate (``--ca``, ``--cert``, ``--key``), read through the one admin client."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

import trio

from meshd.admin.client import (
    DEFAULT_ADMIN,
    AdminClient,
    AdminError,
    Failure,
    admin_ssl_context,
    admin_url,
)
from meshd.errors import MeshError
from meshd.operator_context import load_context


def add_admin_options(p: argparse.ArgumentParser, *, timeout_help: str) -> None:
    p.add_argument("--admin", default=DEFAULT_ADMIN, metavar="ADDR",
                   help=f"the daemon's admin address HOST:PORT, or https://HOST:PORT for an "
                   f"admin API over TLS (default: {DEFAULT_ADMIN})")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS", help=timeout_help)
    p.add_argument("--ca", metavar="FILE",
                   help="over TLS: the mesh CA bundle to verify the admin API with (ca.crt)")
    p.add_argument("--cert", metavar="FILE",
                   help="over TLS: the operator certificate (PEM) to present")
    p.add_argument("--key", metavar="FILE", help="over TLS: the operator certificate's key")


def admin_base(args: argparse.Namespace) -> tuple[str, bool]:
    """``(base URL, over TLS)`` of ``--admin``; ``MeshError`` if it is malformed."""
    try:
        return admin_url(args.admin, bool(args.ca or args.cert))
    except ValueError as exc:
        raise MeshError(f"--admin: {exc}") from exc


def read_state(args: argparse.Namespace, required: Iterable[str]) -> dict[str, Any]:
    """The ``/v1/state`` of the admin API the options name. ``MeshError`` for options that
    cannot work (before connecting), ``AdminError`` when it cannot be read."""
    base, https = admin_base(args)
    if not https and (args.cert or args.key):
        raise MeshError(f"--cert/--key are for an admin API over TLS, but --admin "
                        f"{args.admin} is plain HTTP")
    context = admin_ssl_context(args.ca, args.cert, args.key) if https else None

    async def read() -> dict[str, Any]:
        async with AdminClient(context, client_cert=bool(args.cert),
                               timeout=args.timeout) as admin:
            return await admin.state(base, required=required)

    return trio.run(read)


def failure_line(exc: AdminError) -> str:
    """Why the admin API could not be read, with a hint when nothing answered at all."""
    if exc.failure is Failure.REFUSED:
        return f"{exc.url}: {exc.reason}"
    if exc.failure in (Failure.CONNECT, Failure.TIMEOUT):
        return f"{exc} (is meshd running, and is --admin its admin address?)"
    return str(exc)


def demo_hint(command: str, exc: AdminError) -> str | None:
    """When nothing answered and a running ``meshd up`` recorded its meshds' admin addresses
    (the operator context) elsewhere than where ``command`` looked: where to look instead."""
    if exc.failure not in (Failure.CONNECT, Failure.TIMEOUT):
        return None
    context = load_context()
    if context is None or not context.admin:
        return None
    tried = exc.url.partition("://")[2].partition("/")[0]
    if tried in context.admin:
        return None
    return (f"`meshd up` (pid {context.pid}) runs meshds with admin APIs at "
            f"{', '.join(context.admin)}: try `{command} --admin {context.admin[0]}`")


def signer_line(state: Mapping[str, Any]) -> str:
    """One line: who signed the route table in force (``routes_signed`` in ``/v1/state``)."""
    signed = state.get("routes_signed")
    source = state.get("routes_source", "none")
    if not isinstance(signed, Mapping):
        return f"route table signed by: none in force (from {source})"
    return (f"route table signed by {signed.get('signer_id', '?')} (version "
            f"{signed.get('version', '?')}, at {signed.get('signed_at', '?')}, certificate "
            f"{signed.get('serial', '?')}; from {source})")
