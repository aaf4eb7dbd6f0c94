"""``meshd validate FILE...``"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from meshd.config.load import validate_file


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "validate", help="check meshd.toml / routes.toml / mesh.toml files",
        description="Check configuration files. Exit 0 when all are valid; otherwise print one "
        "line per problem (file: key.path: reason) and exit 1.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        problems = validate_file(path)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            failed = True
        else:
            print(f"{path}: ok")
    return 1 if failed else 0
