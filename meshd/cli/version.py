"""``meshd version`` (and ``meshd --version``): the version from the installed package's metadata,
which the build takes from ``meshd.__version__`` (pyproject's dynamic version), so the two never
disagree; a source tree run without installing falls back to ``meshd.__version__``."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any, TextIO

import meshd
from meshd.cli import exits
from meshd.cli.output import add_output_option, print_json, wants_json

DISTRIBUTION = "meshd"


def meshd_version() -> str:
    from importlib import metadata  # only when asked: it is a large import for one string

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return meshd.__version__


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "version", help="print meshd's version (as --version), the Python it runs on and "
        "where it is installed",)
    add_output_option(p, what="{format, version, python, executable, package}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    package = str(Path(meshd.__file__).resolve().parent)
    if wants_json(args):
        print_json({"format": "meshd.version/1", "version": meshd_version(),
                    "python": platform.python_version(), "executable": sys.executable,
                    "package": package}, stream)
        return exits.OK
    print(f"meshd {meshd_version()}\n"
          f"python {platform.python_version()} ({sys.executable})\n"
          f"package {package}", file=stream)
    return exits.OK
