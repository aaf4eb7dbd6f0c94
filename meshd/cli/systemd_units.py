"""``meshd systemd-units [--print] [UNIT...]``: the systemd units meshd ships (``systemd/`` in the
repository, ``meshd/share/systemd/`` in the wheel), so a host installed from the wheel alone
installs them with ``install -m 0644 $(meshd systemd-units) /etc/systemd/system/``."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from meshd.cli import exits
from meshd.cli.share import shared_dir
from meshd.errors import MeshError

EPILOG = """\
examples:
  install -m 0644 $(meshd systemd-units) /etc/systemd/system/ && systemctl daemon-reload
  install -m 0644 $(meshd systemd-units meshd.service) /etc/systemd/system/
  meshd systemd-units --print meshd-ca.service"""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "systemd-units", help="the systemd units shipped with meshd: their paths, or --print "
        "their text",
        description="Print the path of each unit file this installation of meshd carries "
        "(meshd.service, meshd-ca.service, meshd-registry.service), one per line, or with "
        "--print the files themselves. docs/vm-install.md installs them.", epilog=EPILOG)
    p.add_argument("units", nargs="*", metavar="UNIT",
                   help="unit names, e.g. meshd.service (default: all of them)")
    p.add_argument("--print", action="store_true", dest="print_text",
                   help="print the units' text instead of their paths")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    directory = shared_dir("systemd")
    if directory is None:
        raise MeshError("this installation of meshd carries no systemd units (neither a "
                        "source tree's systemd/ nor the package's share/systemd/)")
    available = {p.name: p for p in sorted(directory.glob("*.service"))}
    unknown = [u for u in args.units if u not in available]
    if unknown:
        print(f"meshd systemd-units: unknown unit {', '.join(unknown)} (there are "
              f"{', '.join(available)})", file=sys.stderr)
        return exits.USAGE
    chosen = [available[u] for u in args.units] if args.units else list(available.values())
    for path in chosen:
        if not args.print_text:
            print(path, file=stream)
        elif len(chosen) == 1:  # verbatim: `--print meshd.service > /etc/systemd/system/...`
            print(path.read_text(), end="", file=stream)
        else:
            print(f"# ---- {path.name}\n{path.read_text()}", end="", file=stream)
    return exits.OK
