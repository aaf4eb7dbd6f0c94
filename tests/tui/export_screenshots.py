"""Copy the console's accepted snapshot SVGs to docs/screenshots/ under stable names, for the
README. Run after `pytest tests/tui --snapshot-update`: python tests/tui/export_screenshots.py"""

from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
SNAPSHOTS = HERE / "__snapshots__" / "test_tui_snapshots"
DOCS = HERE.parents[1] / "docs" / "screenshots"
NAMES = {
    "test_topology_graph.svg": "tui-topology.svg",
    "test_topology_at_80x24_is_an_edge_list.svg": "tui-topology-80x24.svg",
    "test_services.svg": "tui-services.svg",
    "test_hosts.svg": "tui-hosts.svg",
    "test_hosts_at_80x24_keep_why_a_host_is_unreachable.svg": "tui-hosts-80x24.svg",
    "test_events.svg": "tui-events.svg",
    "test_service_detail.svg": "tui-service-detail.svg",
    "test_split_editor.svg": "tui-split-editor.svg",
    "test_service_detail_charts.svg": "tui-service-charts.svg",
    "test_service_detail_charts_at_80x24.svg": "tui-service-charts-80x24.svg",
    "test_split_editor_charts.svg": "tui-split-editor-charts.svg",
    "test_filter.svg": "tui-filter.svg",
    "test_help.svg": "tui-help.svg",
}


def main() -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    for snapshot, name in NAMES.items():
        shutil.copyfile(SNAPSHOTS / snapshot, DOCS / name)
        print(DOCS / name)


if __name__ == "__main__":
    main()
