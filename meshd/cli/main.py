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

# module path -> the top-level subcommands it registers
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "meshd.cli.validate": ("validate",),
    "meshd.cli.run": ("run",),
    "meshd.cli.registry": ("registry",),
    "meshd.cli.ca": ("ca",),
    "meshd.cli.up": ("up",),
    "meshd.cli.tui": ("tui",),
    "meshd.cli.status": ("status",),
    "meshd.cli.routes": ("routes",),
    "meshd.cli.explain": ("explain",),
    "meshd.cli.context": ("context",),
    "meshd.cli.version": ("version",),
    "meshd.cli.completion": ("completion",),
    "meshd.cli.systemd_units": ("systemd-units",),
}
# top-level options that take a value (the value is not a command name)
_VALUED_OPTIONS = ("--log-level", "--log-format")

EPILOG = """\
`meshd COMMAND --help` describes each command; README.md lists them all.
"""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command tree; with ``command``, one of the top-level commands, only the module
    that registers it is imported (``meshd run``, the daemon, then carries neither the CA, nor
    the embedded registry, nor the console's modules: a smaller process that starts sooner)."""
    parser = argparse.ArgumentParser(
        prog="meshd", description="A service mesh for VMs, bare metal and laptops.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action=VersionAction, nargs=0,
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
    for name, commands in COMMAND_MODULES.items():
        if command is not None and command not in commands:
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    _add_exit_codes(parser)
    return parser


class VersionAction(argparse.Action):
    """``--version``: the version is read (from the package metadata) only when asked for."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"meshd {meshd_version()}")
        parser.exit()


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


def command_named(argv: Sequence[str]) -> str | None:
    """The top-level command ``argv`` names, if it names a known one (else None: the whole tree
    parses it and says what is wrong)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUED_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            known = any(arg in commands for commands in COMMAND_MODULES.values())
            return arg if known else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_named(arguments))
    args = parser.parse_args(arguments)
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
