"""The fault suite's session: one mesh over network namespaces (``faultmesh.FaultMesh``) for all
scenarios of ``test_faults.py``, torn down even when a scenario fails, and a summary table of
every scenario's figures at the end of the run.

Tests marked ``faults`` need root and working ``ip netns``; elsewhere they are skipped with the
reason. Stale namespaces of an earlier, killed run (``mft<dead pid>-*``) are swept first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultmesh import FaultMesh
from faultsummary import RESULTS
from netns import netns_usable, sweep_stale

_usable: list[str | None] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("faults") is not None]
    if not marked:
        return
    if not _usable:
        _usable.append(netns_usable())
    reason = _usable[0]
    if reason is not None:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=f"fault suite: {reason}"))


@pytest.fixture(scope="session")
def fault_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultMesh]:
    swept = sweep_stale()
    if swept:
        print(f"swept namespaces of an earlier run: {swept}", file=sys.stderr)
    mesh = FaultMesh(tmp_path_factory.mktemp("faults"))
    problems: list[str] = []
    try:
        mesh.start()
        yield mesh
    except BaseException:
        for label in mesh.procs:
            print(mesh.logs(label), file=sys.stderr)
        raise
    finally:
        problems = mesh.topo.destroy()
    assert problems == [], problems


@pytest.fixture(autouse=True)
def _stop_loads(request: pytest.FixtureRequest) -> Iterator[None]:
    """No load generator outlives its scenario, even one that failed half-way."""
    yield
    if request.node.get_closest_marker("faults") is not None and \
            "fault_mesh" in request.fixturenames:
        request.getfixturevalue("fault_mesh").stop_loads()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("fault suite figures")
    cols = ["scenario", "total", "ok", "failed", "v1", "v2"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in RESULTS)) for c in cols}
    tr.write_line("  ".join(c.ljust(widths[c]) if c == "scenario" else c.rjust(widths[c])
                            for c in cols) + "  figures")
    for row in RESULTS:
        tr.write_line("  ".join(str(row[c]).ljust(widths[c]) if c == "scenario"
                                else str(row[c]).rjust(widths[c]) for c in cols)
                      + f"  {row['figures']}")
    tr.write_line("registry outage (c): MESHD_FAULTS_REGISTRY_DOWN seconds, default 30 "
                  f"(now: {os.environ.get('MESHD_FAULTS_REGISTRY_DOWN') or '30'})")
