"""``meshd routes``: the mesh route table in the registry's KV (``meshd/config/routes``).

``apply FILE`` validates a routes.toml and writes its canonical form; ``show`` prints the stored
table as TOML with its ModifyIndex; ``set-split SERVICE v1=90 v2=10`` changes one split. Every
write is a check-and-set on the ModifyIndex that was read: if someone else changed the key
meanwhile, nothing is written, the command says the index moved and shows the new value, and
exits 1. ``clear`` empties the table on purpose: every meshd refuses a deleted key or a table
without destinations and keeps its own. The registry is ``--registry URL`` (default
``$CONSUL_HTTP_ADDR`` or http://127.0.0.1:8500), the token ``--token`` (default:
``$CONSUL_HTTP_TOKEN``, ``$CONSUL_HTTP_TOKEN_FILE``, else the operator token of a running
``meshd up`` for its registry). Writes are signed with an operator certificate of the mesh CA
(``--operator-cert FILE --operator-key FILE``, else ``$MESHD_OPERATOR_CERT`` and
``$MESHD_OPERATOR_KEY``, else a running ``meshd up``'s for its registry); every meshd refuses an
unsigned table. ``show`` prints who signed the stored table; ``show -o json`` prints
``routes_document``.

Exit status (``meshd.cli.exits``): 0 done, 1 refused (an invalid file, a conflicting write, the
registry said no), 2 usage, 3 the registry cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import tomlkit
import trio

from meshd.cli.output import add_output_option, print_json, wants_json
from meshd.config.load import load_routes
from meshd.errors import ConfigError, Problem
from meshd.registry.config_store import (
    ROUTES_KEY,
    ConfigConflict,
    RouteConfigStore,
    StoredRoutes,
)
from meshd.registry.consul import ConsulClient, operator_token, registry_url
from meshd.registry.operator_key import CERT_ENV, KEY_ENV, operator_key
from meshd.timestamps import format_time_precise


def register(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="URL", default=argparse.SUPPRESS,
                        help="the registry's HTTP API (default: $CONSUL_HTTP_ADDR or "
                             "http://127.0.0.1:8500)")
    common.add_argument("--token", metavar="TOKEN", default=argparse.SUPPRESS,
                        help="ACL token (default: $CONSUL_HTTP_TOKEN, the file "
                             "$CONSUL_HTTP_TOKEN_FILE names, else the operator token of a "
                             "running `meshd up` for its registry)")
    add_operator_options(common)
    parser = subparsers.add_parser("routes", parents=[common],
                                   help=f"the mesh route table in the registry ({ROUTES_KEY})")
    sub = parser.add_subparsers(dest="routes_command", metavar="SUBCOMMAND", required=True)
    apply = sub.add_parser("apply", parents=[common],
                           help="validate a routes.toml and write it to the registry")
    apply.add_argument("file", type=Path, metavar="FILE")
    apply.set_defaults(func=run, action=_apply)
    show = sub.add_parser(
        "show", parents=[common], help="print the route table in force, as TOML",
        description="Print the route table stored in the registry as TOML (what `meshd routes "
        "apply` takes back), with its ModifyIndex and who signed it. -o json prints one "
        "object: {format, registry, key, modify_index, signed, routes}, where routes is the "
        "table in its canonical JSON form (the form meshds read) and signed is null or "
        "{version, signed_at, signer, signer_id, serial}.")
    add_output_option(show, what="the stored table, its ModifyIndex and its signer")
    show.set_defaults(func=run, action=_show)
    split = sub.add_parser(
        "set-split", parents=[common],
        help="set one destination's weighted split (check-and-set)",
        description="Replace SERVICE's weighted split (split in [destinations.SERVICE]): one "
        "SUBSET=WEIGHT per subset declared in its subsets, weights summing to 100. "
        "The table is read, changed, validated, signed and written back with check-and-set; "
        "if someone changed it meanwhile, nothing is written and the command exits 1.",
        epilog="example:\n  meshd routes set-split payments v1=90 v2=10   # 10% canary on v2\n"
               "  meshd routes set-split payments v1=0 v2=100   # move everything to v2\n")
    split.add_argument("service", metavar="SERVICE",
                       help="the destination service whose split changes, e.g. payments")
    split.add_argument("weights", nargs="+", metavar="SUBSET=WEIGHT",
                       help="a subset of SERVICE and its share in percent, e.g. v1=90 v2=10 "
                            "(all weights sum to 100)")
    split.set_defaults(func=run, action=_set_split)
    clear = sub.add_parser("clear", parents=[common],
                           help="empty the route table on purpose (every meshd applies it; "
                                "a deleted or emptied key is refused and the table in force "
                                "stays)")
    clear.set_defaults(func=run, action=_clear)


def add_operator_options(p: argparse.ArgumentParser) -> None:
    """The operator certificate that signs what is written (``meshd routes``, ``meshd tui``)."""
    p.add_argument("--operator-cert", metavar="FILE", type=Path, default=argparse.SUPPRESS,
                   help="operator certificate of the mesh CA that signs the table (default: "
                        f"${CERT_ENV}, else a running `meshd up`'s for its registry)")
    p.add_argument("--operator-key", metavar="FILE", type=Path, default=argparse.SUPPRESS,
                   help=f"its private key (default: ${KEY_ENV})")


Action = Callable[[RouteConfigStore, argparse.Namespace, TextIO], Awaitable[int]]


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    url = registry_url(getattr(args, "registry", None))
    token = operator_token(getattr(args, "token", None), url)
    signer = (operator_key(getattr(args, "operator_cert", None),
                           getattr(args, "operator_key", None), url)
              if args.action is not _show else None)
    action: Action = args.action
    stream = out or sys.stdout

    async def main() -> int:
        async with ConsulClient(url, token=token) as client:
            return await action(RouteConfigStore(client, signer=signer), args, stream)

    return trio.run(main)


def render_toml(stored: StoredRoutes) -> str:
    """The stored table as TOML, in its canonical form (``meshd routes apply`` takes it back):
    one ``[destinations.NAME]`` table each, small tables inline, routes as arrays of tables."""
    doc = tomlkit.document()
    for key, value in stored.data.items():  # default_policy, clear
        if key != "destinations":
            doc.add(key, value)
    destinations = tomlkit.table(is_super_table=True)
    for name, entry in stored.data["destinations"].items():
        table = tomlkit.table()
        for key, value in entry.items():
            table.add(key, _toml_value(value, top=True))
        destinations.add(name, table)
    doc.add("destinations", destinations)
    return tomlkit.dumps(doc)


def _toml_value(value: Any, *, top: bool = False) -> Any:
    if isinstance(value, dict):
        inline = tomlkit.inline_table()
        for key, inner in value.items():
            inline.append(key, _toml_value(inner))
        return inline
    if isinstance(value, list) and top and value and all(isinstance(v, dict) for v in value):
        array = tomlkit.aot()
        for item in value:
            table = tomlkit.table()
            for key, inner in item.items():
                table.add(key, _toml_value(inner))
            array.append(table)
        return array
    if isinstance(value, list):
        return [_toml_value(v) for v in value]
    return value


def _header(store: RouteConfigStore, stored: StoredRoutes) -> str:
    header = f"# {store.key} at ModifyIndex {stored.modify_index} ({store.client.base_url})\n"
    signed = stored.signed
    if signed is not None:
        header += (f"# signed by {signed.signer_id} (certificate {signed.serial}), version "
                   f"{signed.version}, at {format_time_precise(signed.signed_at)}\n")
    elif stored.modify_index:
        header += "# UNSIGNED: every meshd refuses this table and keeps its own\n"
    return header


def _show_conflict(conflict: ConfigConflict, store: RouteConfigStore, out: TextIO) -> int:
    print(f"meshd: {conflict}", file=sys.stderr)
    if conflict.current_error is not None:
        print(f"meshd: the value now stored is not a valid route table:\n"
              f"{conflict.current_error}", file=sys.stderr)
    elif conflict.current is not None:
        print("meshd: the route table now stored:", file=sys.stderr)
        print(_header(store, conflict.current) + render_toml(conflict.current), file=out)
    return 1


async def _apply(store: RouteConfigStore, args: argparse.Namespace, out: TextIO) -> int:
    table = load_routes(args.file)  # ConfigError: file, key path and reason for each problem
    try:
        stored = await store.apply(table)
    except ConfigConflict as conflict:
        return _show_conflict(conflict, store, out)
    print(f"{args.file}: {len(table.destinations)} destination(s) written to {store.key} "
          f"(ModifyIndex {stored.modify_index})", file=out)
    return 0


async def _clear(store: RouteConfigStore, args: argparse.Namespace, out: TextIO) -> int:
    try:
        stored = await store.clear()
    except ConfigConflict as conflict:
        return _show_conflict(conflict, store, out)
    print(f"{store.key} cleared (ModifyIndex {stored.modify_index}): no routes and no rules; "
          "services follow default_policy = \"deny\"", file=out)
    return 0


async def _show(store: RouteConfigStore, args: argparse.Namespace, out: TextIO) -> int:
    stored = await store.read()
    if wants_json(args):
        print_json(routes_document(store, stored), out)
        return 0
    text = render_toml(stored)
    if stored.modify_index == 0:
        text = "# no route table stored: every destination uses all its healthy instances\n"
    print(_header(store, stored) + text, end="" if text.endswith("\n") else "\n", file=out)
    return 0


def routes_document(store: RouteConfigStore, stored: StoredRoutes) -> dict[str, Any]:
    """``meshd routes show -o json``: the stored table (``{"destinations": {}}`` when none is
    stored, with ``modify_index`` 0), where it is and who signed it."""
    return {"format": "meshd.routes/1", "registry": store.client.base_url, "key": store.key,
            "modify_index": stored.modify_index,
            "signed": stored.signed.summary() if stored.signed is not None else None,
            "routes": stored.data}


def parse_weights(items: list[str]) -> dict[str, int]:
    weights: dict[str, int] = {}
    problems = []
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name or not raw.strip().isdigit():
            problems.append(Problem("", item, "expected SUBSET=WEIGHT, e.g. v1=90"))
        elif name in weights:
            problems.append(Problem("", item, f"subset {name!r} given twice"))
        else:
            weights[name] = int(raw)
    if problems:
        raise ConfigError(problems)
    return weights


async def _set_split(store: RouteConfigStore, args: argparse.Namespace, out: TextIO) -> int:
    weights = parse_weights(args.weights)
    try:
        before, after = await store.set_split(args.service, weights)
    except ConfigConflict as conflict:
        return _show_conflict(conflict, store, out)
    old = before.table.get(args.service)
    old_split = ", ".join(f"{leg.subset}={leg.weight}" for leg in old.split) if old else ""
    new_split = ", ".join(f"{k}={v}" for k, v in weights.items())
    print(f"{args.service}: split {old_split or '(none)'} -> {new_split} in {store.key} "
          f"(ModifyIndex {before.modify_index} -> {after.modify_index})", file=out)
    return 0
