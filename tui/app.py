"""``meshd tui``: the operator console (Textual).

The main screen has four views (topology, services, hosts, events) in tabs, a status line and an
events pane when the terminal is tall enough. A worker refreshes the model from the data source
every ``interval`` seconds; the source bounds each read with a timeout, so the UI never waits on
the network. Service detail and the split editor are screens pushed on top; the worker refreshes
one only once it is mounted (it shows the model itself when it mounts), and nothing once the
console is closing. Each view's refresh is contained: a bug in one is logged (the events view,
Textual's log) and shown (a notification, the status line) while the console carries on."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import events, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Input, Static, TabbedContent, TabPane

from tui import fmt
from tui.detail import ServiceScreen
from tui.editor import SplitEditorScreen
from tui.fmt import STYLE, SYMBOL, Status
from tui.model import MeshModel
from tui.screens import DestinationPicker, HelpScreen
from tui.source import MeshSource
from tui.split import editable_destinations
from tui.widgets import (
    EventsPane,
    EventsTable,
    HostsView,
    ServiceChosen,
    ServicesTable,
    SplitRequested,
    TopologyPane,
    selected_key,
)

MAIN_SCREEN_ACTIONS = {"view", "split", "filter", "clear_filter"}
TALL = 34  # rows from which the events pane shows under the views
EVENTS_PANE_LINES = 6


class MeshConsole(App[None]):
    CSS_PATH = Path(__file__).with_name("console.tcss")
    TITLE = "meshd console"
    AUTO_FOCUS = "#topology-pane"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("1", "view('topology')", "Topology", show=False),
        Binding("2", "view('services')", "Services", show=False),
        Binding("3", "view('hosts')", "Hosts", show=False),
        Binding("4", "view('events')", "Events", show=False),
        Binding("w", "split", "Split"),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
        Binding("r", "refresh_now", "Refresh", show=False),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(
        self, source: MeshSource, *, interval: float = 1.0,
        clock: Callable[[], float] = time.time, clock_format: fmt.ClockFormat = fmt.local_clock,
        model: MeshModel | None = None, poll: bool = True,
    ) -> None:
        super().__init__()
        self.source = source
        self.interval = interval
        self.clock = clock
        self.clock_format = clock_format
        self.model = model or MeshModel()
        self.filter_text = ""
        self._poll = poll
        self._wake = asyncio.Event()
        self.refreshes = 0  # completed refreshes (tests wait on it)
        self.view_errors = 0  # view refreshes that raised (contained, logged, shown)
        self._last_view_error = ""

    # -- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        with TabbedContent(initial="topology", id="views"):
            with TabPane("1 Topology", id="topology"):
                yield TopologyPane(id="topology-pane")
            with TabPane("2 Services", id="services"):
                yield ServicesTable(id="services-table")
            with TabPane("3 Hosts", id="hosts"):
                yield HostsView(id="hosts-view")
            with TabPane("4 Events", id="events"):
                yield EventsTable(id="events-table")
        yield EventsPane(id="events-pane")
        yield Input(placeholder="filter services, hosts, events (esc clears)", id="filter",
                    compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self._apply_height(self.size.height)
        self.refresh_views()
        if self._poll:
            self.poll_loop()

    async def on_unmount(self) -> None:
        await self.source.aclose()

    def on_resize(self, event: events.Resize) -> None:
        self._apply_height(event.size.height)

    def _apply_height(self, height: int) -> None:
        self.screen.set_class(height >= TALL, "tall")

    # -- refreshing ----------------------------------------------------------------------------

    @work(exclusive=True, group="poll")
    async def poll_loop(self) -> None:
        while self.is_running:
            started = time.monotonic()
            try:
                self.model.ingest(await self.source.poll())
            except Exception as exc:  # a bug in a source must not take the console down
                self.model.note(self.clock(), "console", "error", f"refresh failed: {exc!r}")
            self.refreshes += 1
            self.refresh_views()
            self._wake.clear()
            delay = max(0.05, self.interval - (time.monotonic() - started))
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    def refresh_views(self) -> None:
        """Show the model: on the main screen, or on whichever screen is on top (once it is
        mounted: until then it has nothing to show it in, and it shows the model itself when
        it mounts). Nothing while the console closes: its screens are being taken down."""
        if not self.is_running:
            return
        if len(self.screen_stack) > 1:
            screen = self.screen
            update = getattr(screen, "model_updated", None)
            if update is not None and screen.is_mounted:
                self.contained(type(screen).__name__, update)
            return
        self.contained("status line", lambda: self.query_one("#status", Static).update(
            self.status_text()))
        now = self.clock()
        active = self.query_one(TabbedContent).active
        if active == "topology":
            self.contained("topology view", lambda: self.query_one(TopologyPane).show(
                self.model, self.filter_text))
        elif active == "services":
            self.contained("services view", lambda: self.query_one(ServicesTable).show(
                self.model, self.filter_text))
        elif active == "hosts":
            self.contained("hosts view", lambda: self.query_one(HostsView).show(
                self.model, self.filter_text, now))
        elif active == "events":
            self.contained("events view", lambda: self.query_one(EventsTable).show(
                self.model, self.filter_text, self.clock_format))
        if self.screen.has_class("tall"):
            self.contained("events pane", lambda: self.query_one(EventsPane).show(
                self.model, self.filter_text, self.clock_format, EVENTS_PANE_LINES))

    def contained(self, what: str, show: Callable[[], object]) -> None:
        """Run one view's refresh; if it raises (a bug), log it and show it, and carry on: the
        other views, the keys and the next refresh still work."""
        try:
            show()
        except Exception as exc:
            self.view_failed(what, exc)

    def view_failed(self, what: str, exc: Exception) -> None:
        self.view_errors += 1
        self.log.error(f"{what} failed to refresh:\n" + "".join(
            traceback.format_exception(exc)))
        message = f"{what} failed to refresh: {exc!r}"
        if message == self._last_view_error:  # once per distinct failure, not every refresh
            return
        self._last_view_error = message
        self.model.note(self.clock(), "console", "error", f"console bug: {message}")
        self.notify(f"{message}\n(the console carries on; the events view has it)",
                    title="console bug", severity="error", timeout=10)

    def status_text(self) -> Text:
        model, now = self.model, self.clock()
        text = Text()
        text.append(" meshd ", style="bold reverse")
        reg = model.registry
        if model.registry_error:
            since = model.registry_outage_since or now
            text.append(f" {SYMBOL[Status.FAIL]} {self.source.description} unreachable "
                        f"{fmt.age(now - since)} (last known view)", style=STYLE[Status.FAIL])
        elif reg is None:
            text.append(f" {SYMBOL[Status.IDLE]} {self.source.description}: waiting",
                        style="dim")
        else:
            text.append(f" {SYMBOL[Status.OK]} {self.source.description}",
                        style=STYLE[Status.OK])
        hosts = model.sorted_hosts()
        up = sum(h.reachable for h in hosts)
        status = Status.OK if up == len(hosts) and hosts else (
            Status.FAIL if hosts else Status.IDLE)
        text.append(f"  {SYMBOL[status]} hosts {up}/{len(hosts)}", style=STYLE[status])
        if reg is not None:
            text.append(f"  routes @{reg.routes_index}", style="dim")
        if model.last_at:
            text.append(f"  {self.clock_format(model.last_at)}", style="dim")
        if self.filter_text:
            text.append(f"  filter: {self.filter_text}", style="bold yellow")
        if self.view_errors:
            text.append(f"  {SYMBOL[Status.FAIL]} console bug: see events",
                        style=STYLE[Status.FAIL])
        return text

    # -- actions -------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # the main screen's actions: not while a detail or editor screen is on top
        return action not in MAIN_SCREEN_ACTIONS or len(self.screen_stack) == 1

    def action_view(self, view: str) -> None:
        self.query_one(TabbedContent).active = view
        self._focus_view(view)
        self.refresh_views()

    def _focus_view(self, view: str) -> None:
        self.query_one(f"#{view}-{'pane' if view == 'topology' else 'table'}").focus()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.refresh_views()

    def action_refresh_now(self) -> None:
        self._wake.set()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.remove_class("shown")
        self.filter_text = ""
        self._focus_view(self.query_one(TabbedContent).active or "topology")
        self.refresh_views()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.filter_text = event.value
            self.refresh_views()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            if not event.value:
                event.input.remove_class("shown")
            self._focus_view(self.query_one(TabbedContent).active or "topology")

    def on_service_chosen(self, message: ServiceChosen) -> None:
        self.push_screen(ServiceScreen(message.service, self.model, self.clock))

    def on_split_requested(self, message: SplitRequested) -> None:
        self.open_split_editor(message.service, message.explicit)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if isinstance(event.data_table, ServicesTable) and event.row_key.value:
            self.post_message(ServiceChosen(str(event.row_key.value)))

    def selected_service(self) -> str | None:
        active = self.query_one(TabbedContent).active
        if active == "topology":
            return self.query_one(TopologyPane).selected
        if active == "services":
            return selected_key(self.query_one(ServicesTable))
        return None

    def action_split(self) -> None:
        self.open_split_editor(self.selected_service())

    def open_split_editor(self, service: str | None, explicit: bool = False) -> None:
        choices = editable_destinations(self.model.stored_routes())
        if service in choices:
            self.push_screen(self.split_editor(service))
        elif len(choices) == 1:
            if explicit:
                self.notify(f"{service} has no subsets to split; editing {choices[0]}")
            self.push_screen(self.split_editor(choices[0]))
        elif choices:
            def chosen(name: str | None) -> None:
                if name:
                    self.push_screen(self.split_editor(name))

            self.push_screen(DestinationPicker(choices), chosen)
        else:
            self.notify("no destination with subsets in the stored route table",
                        severity="warning")

    def split_editor(self, destination: str) -> SplitEditorScreen:
        return SplitEditorScreen(destination, self.source.routes, self.model, clock=self.clock,
                                 clock_format=self.clock_format)


def run_console(source: MeshSource, interval: float = 1.0, **kwargs: Any) -> None:
    MeshConsole(source, interval=interval, **kwargs).run()
