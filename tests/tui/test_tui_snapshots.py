"""What each view shows, pinned as SVG snapshots (pytest-textual-snapshot) of the console on fixed
data (tests/tui/tui_data.py), at a fixed time, in UTC; every main screen also at 80x24, the
smallest terminal the console is made for. After a deliberate change of the screens,
review and accept with `pytest tests/tui --snapshot-update`, then refresh the README's copies with
`python tests/tui/export_screenshots.py`."""

from __future__ import annotations

from collections.abc import Callable

from tui_data import V3_READY, fixed_app

Compare = Callable[..., bool]


def test_topology_graph(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(), terminal_size=(120, 36))


def test_topology_at_80x24_is_an_edge_list(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(), terminal_size=(80, 24))


def test_services(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(), press=["2"], terminal_size=(100, 24))


def test_hosts(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(), press=["3"], terminal_size=(110, 24))


def test_events(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(), press=["4"], terminal_size=(100, 24))


def test_service_detail(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(), press=["2", "down", "down", "enter"],
                        terminal_size=(100, 36))


def test_split_editor(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(), press=["w", "_", "c"], terminal_size=(100, 24))


def test_filter(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(), press=["slash", "p", "a", "y", "enter"],
                        terminal_size=(80, 24))


def test_help(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(), press=["question_mark"], terminal_size=(100, 40))


# -- 80x24 -------------------------------------------------------------------------------------

SMALL = (80, 24)
TO_HOST_E = ["3", "down", "down", "down", "down"]


def test_services_at_80x24_an_empty_0_percent_subset_is_idle(snap_compare: Compare) -> None:
    """payments v3 at 0 % with no instance: a dim ``· 0/0``, not a red ✘ like v2's 0/1."""
    assert snap_compare(fixed_app(routes=V3_READY), press=["2"], terminal_size=SMALL)


def test_topology_at_80x24_an_empty_0_percent_subset_is_idle(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(routes=V3_READY), terminal_size=SMALL)


def test_hosts_at_80x24_keep_why_a_host_is_unreachable(snap_compare: Compare) -> None:
    """host-e's ✘ with its reason in the state column, and in full under the table."""
    assert snap_compare(fixed_app(), press=TO_HOST_E, terminal_size=SMALL)


def test_events_at_80x24(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(), press=["4"], terminal_size=SMALL)


def test_service_detail_at_80x24(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(), press=["2", "down", "down", "enter"], terminal_size=SMALL)


def test_split_editor_at_80x24_an_empty_0_percent_subset_is_idle(snap_compare: Compare
                                                                 ) -> None:
    assert snap_compare(fixed_app(routes=V3_READY), press=["w", "_"], terminal_size=SMALL)


# -- charts: the same mesh after five minutes of history (tests/tui/tui_data.py) ------------------

TO_PAYMENTS = ["2", "down", "down", "enter"]


def test_service_detail_charts(snap_compare: Compare) -> None:
    """payments: v1 steady; v2's burst of 503s two minutes ago and its failure now, on its
    success chart; rate and p99 per subset beside it."""
    assert snap_compare(fixed_app(history=True), press=TO_PAYMENTS, terminal_size=(120, 40))


def test_service_detail_charts_at_80x24(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(history=True), press=TO_PAYMENTS, terminal_size=SMALL)


def test_split_editor_charts(snap_compare: Compare) -> None:
    """The canary's rate, success and p99 under the weights, one line per subset."""
    assert snap_compare(fixed_app(history=True), press=["w"], terminal_size=(120, 30))


def test_split_editor_charts_at_80x24(snap_compare: Compare) -> None:
    assert snap_compare(fixed_app(history=True), press=["w"], terminal_size=SMALL)
