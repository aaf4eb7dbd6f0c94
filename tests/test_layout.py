"""The package layout's rules, checked on the source: no import cycles among ``meshd`` and
``tui`` modules, and ``meshd.config`` stays pure (it never imports the parts that use it).

Imports are read with ``ast`` from every ``.py`` file, including imports inside functions and
under ``TYPE_CHECKING``: a cycle hidden in a function is still a cycle a reader has to untangle.
``from package import name`` counts as an import of ``package.name`` when that is a module.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("meshd", "tui")
# what meshd.config (TOML -> frozen dataclasses) must never import
CONFIG_MUST_NOT_IMPORT = ("meshd.proxy", "meshd.daemon", "meshd.dev", "meshd.registry",
                          "meshd.identity", "meshd.ca", "meshd.admin", "meshd.cli", "tui")


@functools.cache
def module_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported(module: str, path: Path, modules: Mapping[str, Path]) -> Iterator[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target:
                    yield target
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = full if full in modules else _resolve(base, modules)
                if target:
                    yield target


@functools.cache
def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {m: set(_imported(m, p, modules)) - {m} for m, p in modules.items()}


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("forbidden", CONFIG_MUST_NOT_IMPORT)
def test_config_is_pure(forbidden: str) -> None:
    graph = import_graph()
    offenders = sorted(
        f"{m} imports {t}" for m, targets in graph.items() if m.startswith("meshd.config")
        for t in targets if t == forbidden or t.startswith(forbidden + ".")
    )
    assert not offenders, "\n".join(offenders)


def test_proxy_core_is_sans_io() -> None:
    graph = import_graph()
    modules = module_files()
    offenders = []
    for module, path in modules.items():
        if not module.startswith("meshd.proxy.core"):
            continue
        text = path.read_text()
        if "import trio" in text or "from trio" in text:
            offenders.append(f"{module} imports trio")
        offenders += [f"{module} imports {t}" for t in graph[module]
                      if t.startswith("meshd.proxy.") and not t.startswith("meshd.proxy.core")]
    assert not offenders, "\n".join(offenders)
