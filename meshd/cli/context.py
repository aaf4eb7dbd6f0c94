"""``meshd context [--token]``: what a running ``meshd up`` recorded for the operator's commands
(``meshd.operator_context``), or only its registry token, for ``curl -H "X-Consul-Token: ..."``."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from meshd.config.load import read_token_file
from meshd.errors import MeshError
from meshd.operator_context import context_path, load_context


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "context", help="the operator context of a running `meshd up`: registry, token, admin "
        "addresses, operator certificate",
        description="Show the operator context `meshd up` records for this user while it runs "
        "($XDG_RUNTIME_DIR/meshd/context.json, else ~/.local/state/meshd/context.json): "
        "`meshd routes` and `meshd tui` use its registry token when they talk to its registry.",
    )
    p.add_argument("--token", action="store_true",
                   help="print only the operator's registry ACL token (a secret)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    path = context_path()
    context = load_context(path)
    if context is None:
        raise MeshError(f"no operator context at {path}: is `meshd up` running (as this user)?")
    if args.token:
        print(read_token_file(context.token_file, str(path), "registry_token_file"),
              file=stream)
        return 0
    lines = [f"context     {path} (meshd up pid {context.pid}, run dir {context.run_dir})",
             f"registry    {context.registry}",
             f"token file  {context.token_file}  (meshd context --token prints it)",
             f"admin       {' '.join(context.admin)}"]
    if context.operator is not None:
        op = context.operator
        lines.append(f"operator    {op.name}: cert {op.cert}, key {op.key}, CA {op.ca_bundle}")
    print("\n".join(lines), file=stream)
    return 0
