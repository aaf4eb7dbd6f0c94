"""``meshd tui``: the operator console (the ``tui`` package, Textual)."""

from __future__ import annotations

import argparse
import logging
import ssl
from typing import TYPE_CHECKING, Any

from meshd.admin.client import DEFAULT_ADMIN_PORT, admin_ssl_context
from meshd.cli.routes import add_operator_options
from meshd.errors import MeshError
from meshd.registry.consul import DEFAULT_REGISTRY, operator_token, registry_url
from meshd.registry.operator_key import operator_key

if TYPE_CHECKING:
    from tui.source import RegistrySource


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "tui", help="the operator console: live topology, hosts, events; edit traffic splits",
        description="Find every meshd through the registry (each mesh instance's connect-proxy "
        "registration carries its host's admin address and whether that needs an operator "
        "certificate; a host that publishes none is read at its address and --admin-port), "
        "show the mesh live, and edit traffic splits in the registry's KV "
        "with check-and-set. Press ? in the console for its keys.",
    )
    p.add_argument("--registry", default=DEFAULT_REGISTRY, metavar="URL",
                   help=f"registry HTTP API, Consul or `meshd registry serve` "
                   f"(default: {DEFAULT_REGISTRY}; consul://HOST:PORT works too)")
    p.add_argument("--token", metavar="TOKEN", default=None,
                   help="registry ACL token (default: $CONSUL_HTTP_TOKEN, the file "
                   "$CONSUL_HTTP_TOKEN_FILE names, else the operator token of a running "
                   "`meshd up` for this registry)")
    p.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT, metavar="PORT",
                   help="admin API port of the meshds that do not publish their admin address "
                   f"in the registry (default: {DEFAULT_ADMIN_PORT})")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="refresh interval (default: 1)")
    p.add_argument("--admin-ca", metavar="FILE",
                   help="read admin APIs over HTTPS ([admin] tls = true), trusting this CA "
                   "bundle: the mesh's ca.crt (for admin endpoints exposed beyond loopback)")
    p.add_argument("--admin-cert", metavar="FILE",
                   help="operator certificate (PEM) presented to admin APIs over HTTPS "
                   "(meshd ca issue --operator NAME writes NAME.crt, NAME.key and ca.crt)")
    p.add_argument("--admin-key", metavar="FILE", help="the operator certificate's key")
    add_operator_options(p)
    p.set_defaults(func=run)


def admin_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client context for admin APIs over mutual TLS (None: plain HTTP on loopback)."""
    from tui.source import ADMIN_TLS_OPTIONS

    if not (args.admin_ca or args.admin_cert or args.admin_key):
        return None
    return admin_ssl_context(args.admin_ca, args.admin_cert, args.admin_key, ADMIN_TLS_OPTIONS)


def console_source(args: argparse.Namespace) -> RegistrySource:
    """The console's data source as the ``meshd tui`` options ``args`` describe it."""
    from tui.source import RegistrySource

    url = registry_url(args.registry)
    return RegistrySource(url, args.admin_port, token=operator_token(args.token, url),
                          timeout=min(0.8, args.interval * 0.8), admin_tls=admin_tls(args),
                          admin_client_cert=bool(args.admin_cert),
                          signer=operator_key(getattr(args, "operator_cert", None),
                                              getattr(args, "operator_key", None), url))


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.admin_port <= 65535:
        raise MeshError(f"--admin-port {args.admin_port} out of range (1-65535)")
    if args.interval <= 0 or args.interval > 60:
        raise MeshError("--interval must be between 0 and 60 seconds")
    from tui.app import MeshConsole

    source = console_source(args)
    # log lines written to the terminal would tear the screen: the console reports what
    # matters in its events pane instead
    logging.disable(logging.CRITICAL)
    try:
        MeshConsole(source, interval=args.interval).run()
    finally:
        logging.disable(logging.NOTSET)
    return 0
