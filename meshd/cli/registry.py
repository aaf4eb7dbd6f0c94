"""``meshd registry serve``: run the embedded Consul-compatible registry."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import Any

import trio

from meshd import systemd
from meshd.cli.limits import add_limit_flags, limits_from_args
from meshd.conns.fdlimit import raise_nofile_limit
from meshd.errors import RegistryError
from meshd.httpd import parse_hostport
from meshd.registry.embedded.server import (
    DEFAULT_LIMITS,
    RegistryConfig,
    listen_port,
    serve_registry,
)

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("registry", help="the embedded Consul-compatible registry")
    sub = parser.add_subparsers(dest="registry_command", metavar="SUBCOMMAND", required=True)
    serve = sub.add_parser("serve", help="serve the Consul HTTP API subset")
    serve.add_argument("--http", default="127.0.0.1:8500", metavar="ADDR",
                       help="listen address HOST:PORT (default: 127.0.0.1:8500)")
    serve.add_argument("--data-dir", metavar="DIR",
                       help="keep state on disk here (default: in memory only)")
    serve.add_argument("--node", default="meshd-registry", help="node name (default: %(default)s)")
    serve.add_argument("--datacenter", default="dc1", help="datacenter (default: %(default)s)")
    serve.add_argument("--advertise", metavar="IP",
                       help="node address to publish (default: the listen address)")
    acl = serve.add_argument_group(
        "ACLs", "Consul's ACL system (policies, tokens, default policy); off unless enabled, as "
                "with `consul agent -dev`. meshd's guides run with --acl-enabled "
                "--acl-default-policy deny.")
    acl.add_argument("--acl-enabled", action="store_true",
                     help="turn ACLs on (Consul's acl.enabled)")
    acl.add_argument("--acl-default-policy", choices=("allow", "deny"), default="allow",
                     help="what a token may do where no rule says (default: %(default)s, as "
                          "Consul; use deny)")
    acl.add_argument("--acl-initial-management", metavar="TOKEN",
                     default=os.environ.get("MESHD_REGISTRY_ACL_INITIAL_MANAGEMENT") or None,
                     help="secret of a management token created at start-up, which uses up "
                          "the bootstrap (Consul's acl.tokens.initial_management); also from "
                          "$MESHD_REGISTRY_ACL_INITIAL_MANAGEMENT")
    acl.add_argument("--acl-master-token", metavar="TOKEN",
                     default=os.environ.get("MESHD_REGISTRY_ACL_MASTER_TOKEN") or None,
                     help="deprecated: --acl-enabled --acl-default-policy deny "
                          "--acl-initial-management TOKEN; also from "
                          "$MESHD_REGISTRY_ACL_MASTER_TOKEN")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="listen on a non-loopback address with ACLs off (anyone who can "
                            "reach it can change the mesh)")
    add_limit_flags(serve, DEFAULT_LIMITS)
    serve.set_defaults(func=run_serve)


def config_from_args(args: argparse.Namespace) -> RegistryConfig:
    try:
        host, port = parse_hostport(args.http)
    except ValueError as exc:
        raise RegistryError(f"--http: {exc}") from exc
    return RegistryConfig(host=host, port=port, data_dir=args.data_dir, node_name=args.node,
                          datacenter=args.datacenter, advertise=args.advertise,
                          acl_enabled=args.acl_enabled,
                          acl_default_policy=args.acl_default_policy,
                          acl_initial_management=args.acl_initial_management,
                          acl_master_token=args.acl_master_token,
                          allow_unauthenticated=args.allow_unauthenticated,
                          limits=limits_from_args(args))


def run_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.acl_master_token:
        log.warning("--acl-master-token is deprecated: use --acl-enabled --acl-default-policy "
                    "deny --acl-initial-management TOKEN")
    config.validate()  # refuse an exposed listener before anything starts
    raise_nofile_limit()
    trio.run(_main, config)  # a MeshError inside a nursery is unwrapped by meshd.cli.main
    return 0


async def _main(config: RegistryConfig) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve_registry, config)
            systemd.notify(ready=True, status=f"serving the Consul HTTP API on "
                           f"{config.host}:{listen_port(listeners)}")
            nursery.start_soon(systemd.watchdog_task)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("received %s, stopping the registry", signal.Signals(signum).name)
                    systemd.notify(stopping=True, status="stopping")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
