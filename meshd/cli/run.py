"""``meshd run --config meshd.toml``: the per-host daemon (what systemd runs)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import trio

from meshd.config.load import load_host_config

log = logging.getLogger("meshd.daemon.lifetime")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "run", help="run the per-host daemon",
        description="Join the CA, register this host's services, watch the registry and proxy "
        "traffic until SIGTERM (which deregisters and drains). SIGHUP re-reads the config: "
        "health-check changes are applied, other changes are logged as needing a restart. "
        "Under systemd (Type=notify) it reports READY, STATUS, STOPPING and watchdog pings.",
    )
    p.add_argument("--config", "-c", type=Path, default=Path("/etc/meshd/meshd.toml"),
                   help="path to meshd.toml (default: /etc/meshd/meshd.toml)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meshd.conns.fdlimit import raise_nofile_limit
    from meshd.daemon.lifetime import run_daemon
    from meshd.daemon.process import import_httpcore_without_h2

    config = load_host_config(args.config)
    raise_nofile_limit()  # before any socket: the connection caps are sized from it
    import_httpcore_without_h2()  # before any httpx client: h2 only with HTTP/2 traffic
    trio.run(run_daemon, config, args.config)
    log.info("meshd %s stopped", config.node)
    return 0
