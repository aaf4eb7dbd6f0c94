"""The main screen's views: topology, services, hosts, events. Each takes the model (and the
filter) in ``show`` and renders it; choosing a service posts ``ServiceChosen`` up."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Static

from tui import fmt
from tui.events import STALE_AFTER, Event
from tui.fmt import STYLE, SYMBOL, Status
from tui.model import MeshModel
from tui.topology import Drawing, draw
from tui.views import build_graph, host_rows, matches, service_rows

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


def fill_table(table: DataTable[Any], rows: Sequence[tuple[str, Sequence[Any]]]) -> None:
    """Replace a table's rows, keeping the cursor on the same row key when it still exists."""
    keep: str | None = None
    if table.row_count and 0 <= table.cursor_row < table.row_count:
        keep = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    keys = [k for k, _ in rows]
    if keep in keys:
        table.move_cursor(row=keys.index(keep), animate=False)


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


class ServicesTable(DataTable[Any]):
    COLUMNS = ("service", "instances", "subsets (weight healthy/all)", "in rate", "success",
               "p99", "called by")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns(*self.COLUMNS)

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


class HostsTable(DataTable[Any]):
    COLUMNS = ("host", "state", "cpu", "mem", "conns in/out", "registry", "cert", "gen",
               "version",
               "services", "admin")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns(*self.COLUMNS)

    def show(self, model: MeshModel, filter_text: str, now: float) -> None:
        rows = []
        for row in host_rows(model, now, filter_text):
            rec = row.record
            if rec.reachable:
                state = fmt.badge(Status.OK, "up " + fmt.age(row.uptime))
            elif rec.state is None:
                state = fmt.badge(Status.FAIL, "down, never read")
            else:
                state = fmt.badge(Status.FAIL, f"down, data {fmt.age(row.age)} old")
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
            rows.append((rec.admin, [
                Text(rec.node, style="bold"), state,
                fmt.DASH if row.cpu_percent is None else f"{row.cpu_percent:.1f}%",
                fmt.size(row.rss),
                fmt.DASH if row.connections is None else "{}/{}".format(*row.connections),
                registry,
                fmt.badge(fmt.expiry_status(row.cert_expiry), fmt.expiry(row.cert_expiry)),
                gen, row.version, ", ".join(row.services) or fmt.DASH, rec.admin,
            ]))
        fill_table(self, rows)


def event_row(event: Event, clock: fmt.ClockFormat) -> list[Any]:
    status = SEVERITY.get(event.severity, Status.IDLE)
    return [clock(event.at), fmt.badge(status, event.kind), event.text]


class EventsTable(DataTable[Any]):
    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns("time", "kind", "event")

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
