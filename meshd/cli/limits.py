"""The connection-cap flags shared by ``meshd ca serve`` and ``meshd registry serve``."""

from __future__ import annotations

import argparse

from meshd.config.schema import ListenerLimits
from meshd.errors import MeshError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of connections, got {text!r}") \
            from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def add_limit_flags(parser: argparse.ArgumentParser, defaults: ListenerLimits) -> None:
    group = parser.add_argument_group(
        "connection caps", "checked at accept; a connection over a cap is closed at once and "
        "logged (at most one line per cap every 10 s). Both stay under what the open file "
        "limit allows (raised to its hard limit at start).")
    group.add_argument("--max-connections", type=_positive, default=defaults.max_connections,
                       metavar="N", help="connections open at once (default: %(default)s)")
    group.add_argument("--max-connections-per-source", type=_positive,
                       default=defaults.max_per_source, metavar="N",
                       help="connections open at once from one address (default: "
                            "%(default)s)")


def limits_from_args(args: argparse.Namespace) -> ListenerLimits:
    """The caps the flags give; raises ``MeshError`` when the per-source cap is above the
    listener's."""
    total: int = args.max_connections
    per_source: int | None = args.max_connections_per_source
    if per_source is not None and per_source > total:
        raise MeshError(
            f"--max-connections-per-source {per_source} is more than --max-connections {total}")
    return ListenerLimits(total, per_source)
