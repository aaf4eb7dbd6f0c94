"""Service detail: request rate, success rate and p99 per subset over the last minutes (charts),
instances per subset (host, health, ejection by each calling host and for how long, requests in
flight to it from every caller, request rate and its recent history), the routes in force, each
host's config generation and the service's certificates per host."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from tui import fmt
from tui.charts import SubsetCharts, destination_charts
from tui.events import config_reason
from tui.fmt import STYLE, SYMBOL, Status
from tui.model import MeshModel
from tui.topology import leg_parts
from tui.views import Ejection, ServiceDetail, service_detail
from tui.widgets import ColumnsTable, SplitRequested, fill_table

SPARK = 20
HEALTH = {"passing": Status.OK, "warning": Status.WARN, "critical": Status.FAIL}


class ServiceScreen(Screen[None]):
    BINDINGS = [
        Binding("escape,backspace", "back", "Back"),
        Binding("w", "split", "Split"),
        Binding("question_mark", "app.help", "Help", key_display="?"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, service: str, model: MeshModel, clock: Callable[[], float]) -> None:
        super().__init__()
        self.service = service
        self.model = model
        self.clock = clock

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="detail"):
            yield Static(id="detail-title")
            yield Static(f"Requests to {self.service} by subset (its callers' view)",
                         classes="section")
            yield Static(id="charts")
            yield Static("Instances", classes="section")
            yield ColumnsTable("subset", "version", "host", "address", "health", "ejected",
                               "active", "rate", f"last {SPARK}s", id="instances")
            yield Static("Routes in force", classes="section")
            yield Static(id="routes")
            yield ColumnsTable("host", "generation", f"{self.service} split", "stored table",
                               "refused", id="generations")
            yield Static("Certificates", classes="section")
            yield ColumnsTable("host", "serial", "not after", "expires in", id="certs")
        yield Footer()

    def on_mount(self) -> None:
        self.model_updated()
        self.query_one("#instances", DataTable).focus()

    def model_updated(self) -> None:
        detail = service_detail(self.model, self.service, self.clock())
        self.query_one("#detail-title", Static).update(title_text(detail))
        self.query_one("#charts", Static).update(SubsetCharts(
            destination_charts(self.model, self.service), self.model.last_at, self.model.window,
            empty=f"no caller has sent requests to {self.service} yet"))
        self.query_one("#routes", Static).update(routes_text(detail))
        fill_table(self.query_one("#instances", DataTable), instance_rows(detail))
        fill_table(self.query_one("#generations", DataTable), generation_rows(detail))
        fill_table(self.query_one("#certs", DataTable), cert_rows(detail))

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_split(self) -> None:
        self.post_message(SplitRequested(self.service, explicit=True))


def title_text(d: ServiceDetail) -> Text:
    text = Text()
    node = d.node
    status = node.status if node else Status.IDLE
    text.append(f"{SYMBOL[status]} {d.service}", style=f"bold {STYLE[status]}")
    if node:
        text.append(f"   {node.healthy - node.ejected}/{node.total} endpoints healthy")
        if node.ejected:
            text.append(f"  {fmt.EJECTED}{node.ejected} ejected", style=STYLE[Status.FAIL])
    for edge in d.incoming:
        text.append(f"\n  {edge.source} → {d.service}", style="bold")
        for leg in edge.legs:
            subset, rate, success, p99 = leg_parts(leg)
            weight = "" if leg.weight is None else f"{leg.weight}%"
            text.append(f"\n    {subset or 'all':<6} {weight:>4}  {rate:>7} ")
            text.append(f"{success:>6}" + (f" p99 {p99}" if p99 else ""),
                        style=STYLE[leg.status])
    if not d.incoming:
        text.append("\n  no callers seen", style="dim")
    return text


def instance_rows(d: ServiceDetail) -> list[tuple[str, list[Any]]]:
    rows = []
    for inst in d.instances:
        status = HEALTH.get(inst.status, Status.FAIL)
        host = inst.host
        reach = "" if host is None or host.reachable else " (host unreachable)"
        active = Text(fmt.DASH, style="dim") if inst.active is None else Text(
            f"{inst.active}" + (" ?" if inst.active_stale else ""),
            style=STYLE[Status.STALE] if inst.active_stale else "")
        rows.append((f"{inst.node}/{inst.version}", [
            inst.subset or Text("all" if not d.routes or not d.routes.get("subsets")
                                else "none", style="dim"),
            inst.version, inst.node, inst.address,
            fmt.badge(status, inst.status + reach),
            ejection_text(inst.ejections),
            active,
            fmt.rate(inst.rate),
            Text(fmt.sparkline(inst.history, SPARK), style="cyan"),
        ]))
    return rows


def ejection_text(ejections: Sequence[Ejection]) -> Text:
    """``⊘ by host-a for 12s, host-d for 3s`` (``?``: that host's last known answer)."""
    if not ejections:
        return Text("no", style="dim")
    parts = []
    for e in ejections:
        left = "" if e.remaining is None else f" for {fmt.age(e.remaining)}"
        parts.append(f"{e.by}{left}" + (" ?" if e.stale else ""))
    return Text(f"{fmt.EJECTED} by {', '.join(parts)}", style=STYLE[Status.FAIL])


def routes_text(d: ServiceDetail) -> Text:
    text = Text()
    entry = d.routes
    if entry is None:
        text.append(f"no route entry for {d.service} in the stored table "
                    f"(index {d.routes_index}): every healthy instance, round robin",
                    style="dim")
        return text
    subsets = entry.get("subsets") or {}
    split = entry.get("split") or {}
    text.append(f"stored at index {d.routes_index}: ", style="dim")
    parts: list[tuple[str, str]] = []
    if subsets:
        parts.append(("subsets " + ", ".join(f"{k}=version {v.get('version')}"
                                             for k, v in subsets.items()), ""))
    parts.append(("split " + " ".join(f"{k}={v}%" for k, v in split.items()), "bold")
                 if split else ("no split: every healthy instance", ""))
    if entry.get("timeout") is not None:
        parts.append((f"timeout {entry['timeout']:g}s", ""))
    for i, (part, style) in enumerate(parts):
        text.append("; " if i else "")
        text.append(part, style=style or None)
    return text


def generation_rows(d: ServiceDetail) -> list[tuple[str, list[Any]]]:
    rows = []
    for g in d.generations:
        if g.on_stored_routes is None:
            stored = Text(fmt.DASH, style="dim")
        elif g.on_stored_routes:
            stored = fmt.badge(Status.OK, "in force")
        else:
            stored = fmt.badge(Status.WARN, "not yet")
        gen = str(g.generation) if g.generation is not None else fmt.DASH
        if not g.reachable:
            gen += " ?"
        rows.append((g.node, [
            g.node, gen, g.split, stored,
            fmt.badge(Status.FAIL, config_reason(g.config_error)[:60])
            if g.config_error else Text(fmt.DASH, style="dim"),
        ]))
    return rows


def cert_rows(d: ServiceDetail) -> list[tuple[str, list[Any]]]:
    rows = []
    for c in d.certificates:
        status = Status.STALE if c.stale else fmt.expiry_status(c.expires_in)
        rows.append((f"{c.node}/{c.service}", [
            c.node, c.serial, c.not_after, fmt.badge(status, fmt.expiry(c.expires_in)),
        ]))
    if not rows:
        rows.append(("none", [Text("no certificate for this service on any reachable host",
                                   style="dim"), "", "", ""]))
    return rows
