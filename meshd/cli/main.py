"""The ``meshd`` command line. Each subsystem owns its subcommands in a ``command`` module that
exposes ``register(subparsers)``; this module only wires them together and maps errors to exit
codes (``meshd.cli.exits``: 1 refused, 2 usage, 3 unreachable)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from meshd.cli import exits
from meshd.cli.version import meshd_version
from meshd.errors import MeshError, RegistryError, only_mesh_error
from meshd.logformat import LogFormat, configure, format_from_env

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
    "meshd.cli.version",    # version
    "meshd.cli.completion",  # completion bash|zsh|fish|tcsh
    "meshd.cli.systemd_units",  # systemd-units
)

EPILOG = """\
`meshd COMMAND --help` describes each command; README.md lists them all.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshd", description="A service mesh for VMs, bare metal and laptops.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"meshd {meshd_version()}",
                        help="print meshd's version and exit (`meshd version` says more)")
    parser.add_argument(
        "--log-level", default=os.environ.get("MESHD_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"], help="log verbosity (default: info)",
    )
    parser.add_argument(
        "--log-format", default=format_from_env().value, choices=[f.value for f in LogFormat],
        help="log lines as text, or one JSON object per line (default: text; "
             "env MESHD_LOG_FORMAT)",
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
    _add_exit_codes(parser)
    return parser


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, except that a text with line breaks (an epilog with a table or examples) is
    shown as written; one without is wrapped as usual."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _add_exit_codes(parser: argparse.ArgumentParser) -> None:
    """Every command's --help ends with the exit code table."""
    if parser.epilog is None:
        parser.epilog = exits.epilog()
    elif "exit codes:" not in parser.epilog:
        parser.epilog = parser.epilog.rstrip("\n") + "\n\n" + exits.epilog()
    if parser.formatter_class in (argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter):
        parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _add_exit_codes(child)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(getattr(logging, args.log_level.upper()), LogFormat(args.log_format), sys.stderr)
    # httpx logs every request at INFO: meshd's own lines say what matters
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))
    try:
        code = args.func(args)
    except MeshError as exc:
        return _failed(exc)
    except KeyboardInterrupt:
        return exits.INTERRUPTED
    except BaseExceptionGroup as group:
        # trio nurseries wrap errors in groups; a single MeshError is an ordinary refusal
        error = only_mesh_error(group)
        if error is None:
            raise
        return _failed(error)
    return int(code or 0)


def _failed(error: MeshError) -> int:
    """Say why the command failed, in one line (or one per problem), and pick its exit code."""
    code = exits.code_for(error)
    hint = ""
    if code == exits.UNREACHABLE and isinstance(error, RegistryError):
        hint = " (cannot reach the registry: is it running, and is that its address?)"
    print(f"meshd: {error}{hint}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
