"""The split editor: one destination's weights, validated as they change, written with
check-and-set on the stored table's ModifyIndex, then watched as it propagates (hosts on the new
table, measured traffic share per subset). Under the weights, each subset's rate, success rate
and p99 over the last minutes, so a canary is watched from here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rich.text import Text
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Static

from meshd.errors import ConfigError, MeshError
from meshd.registry.config_store import ConfigConflict, RouteConfigStore, StoredRoutes
from tui import fmt
from tui.charts import SubsetSparks, destination_charts
from tui.events import split_text
from tui.fmt import STYLE, SYMBOL, Status
from tui.model import MeshModel
from tui.split import SplitDraft, Validation
from tui.views import endpoints_status, propagation

BODY_HEADER_LINES = 1  # lines above the first subset row in the editor body
BAR = 16


def subset_health(draft: SplitDraft, by_version: Mapping[str, tuple[int, int]] | None
                  ) -> dict[str, tuple[int, int]] | None:
    if by_version is None:
        return None
    return {name: by_version.get(version, (0, 0)) for name, version in draft.subsets}


def render_body(draft: SplitDraft, validation: Validation,
                health: Mapping[str, tuple[int, int]] | None) -> Text:
    text = Text()
    names = draft.names
    width = max(6, *(len(n) for n in names))
    text.append(f"  {'subset':<{width}} {'version':<8} {'endpoints':<10} {'stored':>6}  "
                f"{'new':>5}", style="bold")
    for i, name in enumerate(names):
        text.append("\n")
        selected = i == draft.cursor
        text.append("▶ " if selected else "  ", style="bold cyan")
        text.append(f"{name:<{width}} {draft.version(name):<8} ")
        healthy, total = (health or {}).get(name, (0, 0))
        if health is None:
            text.append(f"{'?':<10}", style=STYLE[Status.IDLE])
        else:
            status = endpoints_status(healthy, total, draft.weights[name] > 0)
            dot = fmt.HEALTHY_DOT if status is Status.OK else SYMBOL[status]
            text.append(f"{dot} {healthy}/{total}".ljust(10), style=STYLE[status])
        stored = draft.stored.get(name) if draft.stored else None
        text.append(f" {fmt.DASH if stored is None else stored:>6}  ")
        weight = draft.weights[name]
        cell = f"[{draft.typed:>3}]" if selected and draft.typed else f"{weight:>5}"
        changed = stored != weight
        text.append(cell, style=("reverse bold" if selected else "bold") +
                    (" yellow" if changed else ""))
        text.append(" " + fmt.bar(weight / 100, BAR), style="cyan" if weight else "dim")
        if name == draft.stable:
            text.append(" stable", style="green")
        elif name == draft.canary() and draft.stable != draft.canary():
            text.append(" canary", style="yellow")
    text.append("\n")
    total_status = Status.OK if draft.total == 100 else Status.FAIL
    text.append(f"  total {draft.total} {SYMBOL[total_status]}", style=STYLE[total_status])
    text.append("   preview: ", style="dim")
    moves = [f"{n} {fmt.DASH if old is None else old}→{new}" for n, old, new in draft.preview()
             if old != new]
    text.append(", ".join(moves) if moves else "no change", style="bold" if moves else "dim")
    for error in validation.errors:
        text.append(f"\n  {SYMBOL[Status.FAIL]} {error}", style=STYLE[Status.FAIL])
    for warning in validation.warnings:
        text.append(f"\n  {SYMBOL[Status.WARN]} {warning}", style=STYLE[Status.WARN])
    if validation.ok and not validation.warnings and validation.changed:
        text.append(f"\n  {SYMBOL[Status.OK]} valid: a/enter applies", style=STYLE[Status.OK])
    return text


class SplitEditorScreen(Screen[None]):
    BINDINGS = [
        Binding("up,k", "move(-1)", "Up", show=False),
        Binding("down,j", "move(1)", "Down", show=False),
        Binding("left,minus", "adjust(-1)", "-1", show=False),
        Binding("right,plus", "adjust(1)", "+1", show=False),
        Binding("shift+left,left_square_bracket", "adjust(-10)", "-10", show=False),
        Binding("shift+right,right_square_bracket", "adjust(10)", "+10", show=False),
        *(Binding(str(d), f"digit('{d}')", str(d), show=False) for d in range(10)),
        Binding("backspace", "backspace", "Delete digit", show=False),
        Binding("a,enter", "apply", "Apply"),
        Binding("c", "step", "Canary step"),
        Binding("b", "rollback", "Roll back"),
        Binding("equals_sign", "balance", "Balance", key_display="="),
        Binding("s", "mark_stable", "Stable", show=False),
        Binding("r", "reload", "Reload"),
        Binding("escape", "close", "Close"),
        Binding("question_mark", "app.help", "Help", key_display="?"),
    ]

    def __init__(self, destination: str, routes: RouteConfigStore, model: MeshModel, *,
                 clock: Callable[[], float], clock_format: fmt.ClockFormat) -> None:
        super().__init__()
        self.destination = destination
        self.routes = routes
        self.model = model
        self.clock = clock
        self.clock_format = clock_format
        self.base: StoredRoutes | None = None
        self.draft: SplitDraft | None = None
        self.result = Text()  # the outcome of the last apply (written, conflict, error)
        self.target: Mapping[str, Any] | None = None  # the table written by the last apply
        self.baseline: dict[str, float] | None = None  # counts when every host had it
        self.acknowledged: tuple[str, ...] = ()
        self.busy = False
        self.writes = 0  # successful writes (tests wait on it)
        self.conflicts = 0

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="editor"):
            yield Static(id="editor-title")
            yield Static("reading the stored route table…", id="editor-body")
            yield Static(id="editor-charts")
            with Horizontal(id="editor-buttons"):
                yield Button("Apply", id="apply", compact=True, variant="primary")
                yield Button("Canary step", id="step", compact=True)
                yield Button("Roll back", id="rollback", compact=True, variant="warning")
                yield Button("Reload", id="reload", compact=True)
                yield Button("Close", id="close", compact=True)
            yield Static(id="editor-result")
            yield Static(id="editor-propagation")
        yield Footer()

    def on_mount(self) -> None:
        self.load()

    # -- reading and showing -------------------------------------------------------------------

    @work(exclusive=True, group="editor-io")
    async def load(self) -> None:
        try:
            stored = await self.routes.read()
            draft = SplitDraft.from_routes(stored.data, self.destination)
        except (MeshError, ValueError) as exc:
            self.result = Text(f"{SYMBOL[Status.FAIL]} cannot edit {self.destination}: {exc}",
                               style=STYLE[Status.FAIL])
            self.render_all()
            return
        if self.draft is not None:
            draft.stable = self.draft.stable if self.draft.stable in draft.names else draft.stable
        self.base, self.draft = stored, draft
        self.acknowledged = ()
        self.render_all()

    def validation(self) -> Validation:
        assert self.draft is not None
        return self.draft.validate(self.health())

    def health(self) -> dict[str, tuple[int, int]] | None:
        assert self.draft is not None
        return subset_health(self.draft, self.model.health_by_version(self.destination))

    def render_all(self) -> None:
        title = Text()
        title.append(f"Split editor · {self.destination}", style="bold")
        if self.base is not None:
            title.append(f"   stored table at index {self.base.modify_index}", style="dim")
        self.query_one("#editor-title", Static).update(title)
        if self.draft is not None:
            self.query_one("#editor-body", Static).update(
                render_body(self.draft, self.validation(), self.health()))
        self.query_one("#editor-charts", Static).update(SubsetSparks(
            destination_charts(self.model, self.destination, titled=False),
            self.model.last_at, self.model.window))
        self.query_one("#editor-result", Static).update(self.result)
        self.query_one("#editor-propagation", Static).update(self.propagation_text())

    def model_updated(self) -> None:
        self.render_all()

    def propagation_text(self) -> Text:
        if self.target is None:
            return Text()
        model = self.model
        prop = propagation(model, self.target)
        text = Text()
        status = Status.OK if prop.complete else (Status.FAIL if prop.refused else Status.WARN)
        text.append(f"{SYMBOL[status]} propagation: {len(prop.applied)} of {prop.total} hosts "
                    "on the new table", style=STYLE[status])
        parts = [(f"{n} gen {g}", Status.OK) for n, g in prop.applied]
        parts += [(f"{n} pending", Status.WARN) for n in prop.pending]
        parts += [(f"{n} refused: {why}", Status.FAIL) for n, why in prop.refused]
        parts += [(f"{n} unreachable", Status.STALE) for n in prop.unreachable]
        for i, (label, st) in enumerate(parts):
            text.append("\n  " if i == 0 else "  ")
            text.append(f"{SYMBOL[st]} {label}", style=STYLE[st])
        if prop.complete and self.baseline is None:
            self.baseline = model.outbound_counts(self.destination)
        text.append("\n")
        text.append_text(self.share_text())
        return text

    def share_text(self) -> Text:
        """Requests per subset since every host had the new table, against the weights."""
        text = Text()
        if self.baseline is None or self.target is None:
            text.append("measured share: waiting for every host to take the new table",
                        style="dim")
            return text
        now = self.model.outbound_counts(self.destination)
        counts = {k: max(0.0, v - self.baseline.get(k, 0.0)) for k, v in now.items()}
        total = sum(counts.values())
        split = ((self.target.get("destinations") or {}).get(self.destination) or {}).get(
            "split") or {}
        text.append(f"measured share since then ({total:.0f} requests):", style="bold")
        for name, weight in split.items():
            share = counts.get(name, 0.0) / total if total else 0.0
            text.append(f"\n  {name:<6} {share * 100:5.1f}% ")
            text.append(fmt.bar(share, BAR), style="cyan")
            text.append(f" target {weight}%", style="dim")
        return text

    # -- editing ---------------------------------------------------------------------------------

    def _edit(self, change: str, *args: Any) -> None:
        if self.draft is None or self.busy:
            return
        getattr(self.draft, change)(*args)
        self.render_all()

    def action_move(self, delta: int) -> None:
        self._edit("move", delta)

    def action_adjust(self, delta: int) -> None:
        self._edit("adjust", delta)

    def action_digit(self, digit: str) -> None:
        self._edit("type_digit", digit)

    def action_backspace(self) -> None:
        self._edit("backspace")

    def action_step(self) -> None:
        self._edit("step")

    def action_rollback(self) -> None:
        self._edit("rollback")

    def action_balance(self) -> None:
        self._edit("balance")

    def action_mark_stable(self) -> None:
        self._edit("mark_stable")

    def action_reload(self) -> None:
        self.result = Text()
        self.load()

    def action_close(self) -> None:
        self.app.pop_screen()

    def on_click(self, event: events.Click) -> None:
        body = self.query_one("#editor-body", Static)
        offset = event.get_content_offset(body)
        if offset is None or self.draft is None:
            return
        row = offset.y - BODY_HEADER_LINES
        if 0 <= row < len(self.draft.names):
            self.draft.select(self.draft.names[row])
            self.render_all()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        action = {"apply": self.action_apply, "step": self.action_step,
                  "rollback": self.action_rollback, "reload": self.action_reload,
                  "close": self.action_close}.get(event.button.id or "")
        if action is not None:
            action()

    # -- applying --------------------------------------------------------------------------------

    def action_apply(self) -> None:
        if self.draft is None or self.base is None or self.busy:
            return
        check = self.validation()
        if not check.ok:
            self.result = Text(f"{SYMBOL[Status.FAIL]} not applied: {check.errors[0]}",
                               style=STYLE[Status.FAIL])
        elif not check.changed:
            self.result = Text("nothing to apply: the split is as stored", style="dim")
        elif check.warnings and check.warnings != self.acknowledged:
            self.acknowledged = check.warnings
            self.result = Text(f"{SYMBOL[Status.WARN]} {check.warnings[0]}: press a again to "
                               "apply anyway", style=STYLE[Status.WARN])
        else:
            self.busy = True
            self.result = Text("writing…", style="dim")
            self.write(self.base, self.draft.split())
        self.render_all()

    @work(exclusive=True, group="editor-io")
    async def write(self, base: StoredRoutes, split: dict[str, int]) -> None:
        assert self.draft is not None
        now = self.clock()
        mine = " ".join(f"{k}={v}" for k, v in split.items())
        try:
            table = self.draft.to_table(base.data)
            written = await self.routes.write(table, base)
            after = await self.routes.read()
        except ConfigConflict as conflict:
            self.conflicts += 1
            self._conflict(base, conflict, mine, now)
        except ConfigError as exc:
            self.result = Text(f"{SYMBOL[Status.FAIL]} not applied, meshd would refuse it: "
                               f"{exc}", style=STYLE[Status.FAIL])
        except MeshError as exc:
            self.result = Text(f"{SYMBOL[Status.FAIL]} not applied: {exc}",
                               style=STYLE[Status.FAIL])
            self.model.note(now, "console", "error",
                            f"split of {self.destination} not written: {exc}")
        else:
            self.writes += 1
            self._written(base, after, written.data, mine, now)
        finally:
            self.busy = False
        self.acknowledged = ()
        self.render_all()

    def _written(self, base: StoredRoutes, after: StoredRoutes, target: Mapping[str, Any],
                 mine: str, now: float) -> None:
        assert self.draft is not None
        self.target, self.baseline = target, None
        moved = f"index {base.modify_index} → {after.modify_index}"
        self.result = Text(f"{SYMBOL[Status.OK]} written at {self.clock_format(now)}: "
                           f"{self.destination} {mine} ({moved}, check-and-set)",
                           style=STYLE[Status.OK])
        self.model.note(now, "console", "info",
                        f"split of {self.destination} written: {mine} ({moved})")
        stable = self.draft.stable
        self.base = after
        self.draft = SplitDraft.from_routes(after.data, self.destination)
        self.draft.stable = stable
        if after.data != target:
            self.result.append(f"\n{SYMBOL[Status.WARN]} the table changed again right after "
                               "(someone else): showing what is stored now",
                               style=STYLE[Status.WARN])

    def _conflict(self, base: StoredRoutes, conflict: ConfigConflict, mine: str,
                  now: float) -> None:
        after = conflict.current
        theirs = "(not a valid route table)" if conflict.current_error is not None or \
            after is None else split_text(after.data, self.destination)
        moved = f"index {base.modify_index} → {after.modify_index if after else '?'}"
        self.result = Text(
            f"{SYMBOL[Status.FAIL]} conflict: the stored route table changed since it was read "
            f"({moved}); nothing was written.\n"
            f"  stored now: {self.destination} {theirs}   yours: {mine}\n"
            "  r reloads the stored split (your edit is dropped); then edit and apply again.",
            style=STYLE[Status.FAIL])
        self.model.note(now, "console", "warn",
                        f"split of {self.destination} not written: changed by someone "
                        f"else ({moved}, now {theirs})")
