"""The ``meshd`` command line. Each subsystem owns its subcommands in a ``command`` module that
exposes ``register(subparsers)``; this module only wires them together and maps errors to exit
codes."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from meshd.errors import MeshError, only_mesh_error

# module path -> registers one or more top-level subcommands
COMMAND_MODULES = (
    "meshd.cli.validate",     # validate
    "meshd.cli.run",     # run
    "meshd.cli.registry",   # registry serve
    "meshd.cli.ca",         # ca init|token|issue|serve
    "meshd.cli.up",        # up
    "meshd.cli.tui",        # tui
    "meshd.cli.status",     # status
    "meshd.cli.routes",     # routes apply|show|set-split
    "meshd.cli.explain",    # explain
    "meshd.cli.context",    # context
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshd", description="A service mesh for VMs, bare metal and laptops."
    )
    parser.add_argument(
        "--log-level", default=os.environ.get("MESHD_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"], help="log verbosity (default: info)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO: meshd's own lines say what matters
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))
    try:
        code = args.func(args)
    except MeshError as exc:
        print(f"meshd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        # trio nurseries wrap errors in groups; a single MeshError is an ordinary refusal
        error = only_mesh_error(group)
        if error is None:
            raise
        print(f"meshd: {error}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
