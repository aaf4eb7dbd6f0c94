"""The main screen's views: topology, services, hosts, events. Each takes the model (and the
filter) in ``show`` and renders it; choosing a service posts ``ServiceChosen`` up."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Static

from tui import fmt
from tui.events import STALE_AFTER, Event, config_reason
from tui.fmt import STYLE, SYMBOL, Status
from tui.model import MeshModel
from tui.topology import Drawing, draw
from tui.views import HostRow, build_graph, host_rows, matches, service_rows

SEVERITY = {"info": Status.OK, "warn": Status.WARN, "error": Status.FAIL}


class ServiceChosen(Message):
    """The operator picked a service (enter, click): show its detail."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service


class SplitRequested(Message):
    """The operator asked to edit a service's split from a screen (``explicit``: that very
    service was asked for, so say so if another one is edited instead)."""

    def __init__(self, service: str | None, explicit: bool = False) -> None:
        super().__init__()
        self.service = service
        self.explicit = explicit


class ColumnsTable(DataTable[Any]):
    """A table with a row cursor and its columns from construction on, so it can be filled as
    soon as it is composed (before its own mount, or its screen's)."""

    COLUMNS: tuple[str, ...] = ()

    def __init__(self, *columns: str, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", **kwargs)
        self.add_columns(*(columns or self.COLUMNS))


def fill_table(table: DataTable[Any], rows: Sequence[tuple[str, Sequence[Any]]]) -> None:
    """Replace a table's rows, keeping the cursor on the same row key when it still exists and
    the scroll position (a refresh must not snap the operator back to the top left). Every row
    has one cell per column: a row of another shape is a bug, raised before anything changes."""
    width = len(table.columns)
    for key, cells in rows:
        if len(cells) != width:
            raise ValueError(f"table #{table.id}: row {key!r} has {len(cells)} cells for "
                             f"{width} columns")
    keep: str | None = None
    if table.row_count and 0 <= table.cursor_row < table.row_count:
        keep = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
    scroll_x, scroll_y = table.scroll_x, table.scroll_y
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    keys = [k for k, _ in rows]
    if keep in keys:
        table.move_cursor(row=keys.index(keep), animate=False, scroll=False)
    table.scroll_to(scroll_x, scroll_y, animate=False, immediate=True)


def selected_key(table: DataTable[Any]) -> str | None:
    if not table.row_count:
        return None
    return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)


# -- topology ----------------------------------------------------------------------------------


class TopologyCanvas(Static):
    drawing: Drawing | None = None

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if self.drawing is None or offset is None:
            return
        service = self.drawing.service_at(offset.x, offset.y)
        if service is not None:
            pane = self.parent
            if isinstance(pane, TopologyPane):
                pane.selected = service
                pane.redraw()
            self.post_message(ServiceChosen(service))


class TopologyPane(VerticalScroll):
    """The service graph; arrows move the selection, enter opens the selected service."""

    BINDINGS = [
        Binding("down,right,j", "move(1)", "Next", show=False),
        Binding("up,left,k", "move(-1)", "Previous", show=False),
        Binding("enter", "open", "Detail"),
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.selected: str | None = None
        self._model: MeshModel | None = None
        self._filter = ""
        self._order: list[str] = []

    def compose(self) -> Any:
        yield TopologyCanvas(id="topology-canvas")

    def show(self, model: MeshModel, filter_text: str) -> None:
        self._model, self._filter = model, filter_text
        self.redraw()

    def redraw(self) -> None:
        if self._model is None:
            return
        nodes, edges = build_graph(self._model, self._filter)
        self._order = [n.service for n in nodes]
        if self.selected not in self._order:
            self.selected = self._order[0] if self._order else None
        width = max(20, self.scrollable_content_region.width or self.size.width or 80)
        drawing = draw(nodes, edges, width, self.selected)
        canvas = self.query_one(TopologyCanvas)
        canvas.drawing = drawing
        canvas.update(drawing.text)

    def on_resize(self, event: events.Resize) -> None:
        self.redraw()

    def action_move(self, delta: int) -> None:
        if not self._order:
            return
        index = self._order.index(self.selected) if self.selected in self._order else -delta
        self.selected = self._order[(index + delta) % len(self._order)]
        self.redraw()

    def action_open(self) -> None:
        if self.selected:
            self.post_message(ServiceChosen(self.selected))


# -- services, hosts, events -------------------------------------------------------------------


class ServicesTable(ColumnsTable):
    COLUMNS = ("service", "instances", "subsets (weight healthy/all)", "in rate", "success",
               "p99", "called by")

    def show(self, model: MeshModel, filter_text: str) -> None:
        rows = []
        for row in service_rows(model, filter_text):
            node = row.node
            subsets = Text()
            for sub in node.subsets:
                if subsets:
                    subsets.append("  ")
                weight = "" if sub.weight is None else f"{sub.weight}% "
                subsets.append(f"{sub.name or sub.version} {weight}")
                subsets.append(f"{SYMBOL[sub.status]}{sub.healthy}/{sub.total}",
                               style=STYLE[sub.status])
            t = row.inbound
            rows.append((node.service, [
                fmt.badge(node.status, node.service),
                f"{node.healthy - node.ejected}/{node.total}"
                + (f" {fmt.EJECTED}{node.ejected}" if node.ejected else ""),
                subsets or Text(fmt.DASH, style="dim"),
                fmt.rate(t.rate) if t.requests else fmt.DASH,
                fmt.percent(t.success), fmt.duration(t.p99),
                ", ".join(row.callers) or fmt.DASH,
            ]))
        fill_table(self, rows)


REASON_WIDTH = 24  # of an unreachable host's reason in its state cell (the full one below)


class HostsTable(ColumnsTable):
    COLUMNS = ("host", "state", "cpu", "mem", "conns in/out", "registry", "cert", "gen",
               "version", "services", "admin")

    def show(self, rows: Sequence[HostRow]) -> None:
        fill_table(self, [(row.record.admin, host_cells(row)) for row in rows])


def host_state(row: HostRow) -> Text:
    """Up and for how long, or why not (clipped: it is the second column, seen at 80x24)."""
    rec = row.record
    if rec.reachable:
        return fmt.badge(Status.OK, "up " + fmt.age(row.uptime))
    when = "never read" if rec.state is None else f"data {fmt.age(row.age)} old"
    return fmt.badge(Status.FAIL, f"{fmt.clip(rec.error, REASON_WIDTH)} · {when}")


def host_cells(row: HostRow) -> list[Any]:
    rec = row.record
    stale = row.staleness
    if stale is None:
        registry: Text | str = fmt.DASH
    else:
        fresh = stale < STALE_AFTER and not row.watch_error
        registry = fmt.badge(Status.OK if fresh else Status.WARN, fmt.age(stale))
    gen = Text(str(row.generation if row.generation is not None else fmt.DASH))
    if row.on_stored_routes is False:
        gen.append(" ≠", style=STYLE[Status.WARN])
    if row.config_error:
        gen.append(" ✘refused", style=STYLE[Status.FAIL])
    return [
        Text(rec.node, style="bold"), host_state(row),
        fmt.DASH if row.cpu_percent is None else f"{row.cpu_percent:.1f}%",
        fmt.size(row.rss),
        fmt.DASH if row.connections is None else "{}/{}".format(*row.connections),
        registry,
        fmt.badge(fmt.expiry_status(row.cert_expiry), fmt.expiry(row.cert_expiry)),
        gen, row.version, ", ".join(row.services) or fmt.DASH, rec.admin,
    ]


def host_detail(row: HostRow) -> Text:
    """The selected host in full, under the table: why it is unreachable, why it refuses the
    stored route table, what its registry watch reports."""
    rec = row.record
    text = Text()
    text.append(rec.node, style="bold")
    text.append(f" {rec.admin} ", style="dim")
    if rec.reachable:
        text.append_text(fmt.badge(Status.OK, "up " + fmt.age(row.uptime)))
        if row.workers:
            text.append(f" {row.workers} worker processes (CPU and RSS: all of them)",
                        style="dim")
    else:
        text.append_text(fmt.badge(Status.FAIL, f"unreachable: {rec.error}"))
        text.append(" (never read)" if rec.state is None else
                    f" (showing its data of {fmt.age(row.age)} ago)", style="dim")
    if row.config_error:
        text.append("\n")
        text.append_text(fmt.badge(Status.FAIL, "refuses the stored route table: "
                                   + config_reason(row.config_error)))
    elif row.on_stored_routes is False:
        text.append("\n")
        text.append_text(fmt.badge(Status.WARN, "not on the stored route table yet"))
    if row.watch_error:
        text.append("\n")
        text.append_text(fmt.badge(Status.WARN, f"registry watch: {row.watch_error}"))
    return text


class HostsView(Vertical):
    """The hosts table and, under it, the selected host in full."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._rows: dict[str, HostRow] = {}

    def compose(self) -> Any:
        yield HostsTable(id="hosts-table")
        yield Static(id="host-detail")

    def show(self, model: MeshModel, filter_text: str, now: float) -> None:
        rows = host_rows(model, now, filter_text)
        self._rows = {row.record.admin: row for row in rows}
        self.query_one(HostsTable).show(rows)
        self.show_detail()

    def show_detail(self) -> None:
        row = self._rows.get(selected_key(self.query_one(HostsTable)) or "")
        self.query_one("#host-detail", Static).update(
            host_detail(row) if row else Text("no host", style="dim"))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_detail()


def event_row(event: Event, clock: fmt.ClockFormat) -> list[Any]:
    status = SEVERITY.get(event.severity, Status.IDLE)
    return [clock(event.at), fmt.badge(status, event.kind), event.text]


class EventsTable(ColumnsTable):
    COLUMNS = ("time", "kind", "event")

    def show(self, model: MeshModel, filter_text: str, clock: fmt.ClockFormat) -> None:
        shown = [e for e in model.events if matches(filter_text, e.kind, e.text)]
        rows = [(str(i), event_row(e, clock)) for i, e in enumerate(shown)][::-1]
        fill_table(self, rows)


class EventsPane(Static):
    """The latest events, under the views when the terminal is tall enough."""

    def show(self, model: MeshModel, filter_text: str, clock: fmt.ClockFormat,
             lines: int) -> None:
        shown = [e for e in model.events if matches(filter_text, e.kind, e.text)][-lines:]
        text = Text()
        for event in reversed(shown):
            if text:
                text.append("\n")
            status = SEVERITY.get(event.severity, Status.IDLE)
            text.append(clock(event.at) + " ", style="dim")
            text.append(SYMBOL[status] + " ", style=STYLE[status])
            text.append(event.text)
        self.update(text or Text("no events yet", style="dim"))
