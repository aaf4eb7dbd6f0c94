"""``routes.toml``, the mesh's traffic rules: a parsed mapping (or its canonical JSON form, as
kept in the registry's KV) in, a frozen ``RouteTable`` out, or a ``ConfigError`` listing every
problem with its key path; and back (``routes_to_data``). Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshd.config.reader import Reader
from meshd.config.schema import DestinationRoutes, RouteTable, SplitLeg, Subset
from meshd.names import is_valid_name

DESTINATION_KEYS = {"subsets", "split", "timeout"}


def parse_routes(data: Mapping[str, Any], file: str = "routes.toml") -> RouteTable:
    """Build a ``RouteTable`` from a parsed ``routes.toml`` (or its canonical JSON form)."""
    r = Reader(file)
    r.unknown_keys(data, "", {"destinations"})
    dests_raw = r.get(data, "destinations", "", dict, {}) or {}
    dests: list[DestinationRoutes] = []
    for service, raw in dests_raw.items():
        path = f"destinations.{service}"
        if not is_valid_name(service):
            r.problem(path, f"invalid service name {service!r}")
            continue
        if not isinstance(raw, dict):
            r.problem(path, "expected a table")
            continue
        dest = _parse_destination(r, service, raw, path)
        if dest is not None:
            dests.append(dest)
    r.fail_if_problems()
    return RouteTable(tuple(sorted(dests, key=lambda d: d.service)))


def _parse_destination(
    r: Reader, service: str, raw: Mapping[str, Any], path: str
) -> DestinationRoutes | None:
    before = len(r.problems)
    r.unknown_keys(raw, path, DESTINATION_KEYS)
    subsets: list[Subset] = []
    for name, sub in (r.get(raw, "subsets", path, dict, {}) or {}).items():
        spath = f"{path}.subsets.{name}"
        if not is_valid_name(name):
            r.problem(spath, f"invalid subset name {name!r}")
            continue
        if not isinstance(sub, dict):
            r.problem(spath, "expected a table like { version = \"v1\" }")
            continue
        r.unknown_keys(sub, spath, {"version"})
        version = r.name(sub, "version", spath)
        if version is not None:
            subsets.append(Subset(name, version))
    split: list[SplitLeg] = []
    split_raw = r.get(raw, "split", path, dict, {}) or {}
    known = {s.name for s in subsets}
    for name, weight in split_raw.items():
        lpath = f"{path}.split.{name}"
        if isinstance(weight, bool) or not isinstance(weight, int):
            r.problem(lpath, f"weight must be an integer, got {weight!r}")
            continue
        if not 0 <= weight <= 100:
            r.problem(lpath, f"weight {weight} out of range (0-100)")
            continue
        if name not in known:
            hint = f" (declared: {', '.join(sorted(known))})" if known else \
                " (declare it under subsets)"
            r.problem(lpath, f"unknown subset {name!r}{hint}")
            continue
        split.append(SplitLeg(name, weight))
    if split and len(split) == len(split_raw):
        total = sum(leg.weight for leg in split)
        if total != 100:
            r.problem(f"{path}.split", f"weights sum to {total}, must sum to 100")
    timeout = r.duration(raw, "timeout", path, None)
    if len(r.problems) != before:
        return None
    return DestinationRoutes(service, tuple(subsets), tuple(split), timeout)


def routes_to_data(table: RouteTable) -> dict[str, Any]:
    """The canonical mapping form of a route table (what is stored in the registry's KV as
    JSON); ``parse_routes(routes_to_data(t)) == t``."""
    out: dict[str, Any] = {}
    for d in table.destinations:
        entry: dict[str, Any] = {}
        if d.subsets:
            entry["subsets"] = {s.name: {"version": s.version} for s in d.subsets}
        if d.split:
            entry["split"] = {leg.subset: leg.weight for leg in d.split}
        if d.timeout is not None:
            entry["timeout"] = d.timeout
        out[d.service] = entry
    return {"destinations": out}
