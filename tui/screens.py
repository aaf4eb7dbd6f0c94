"""Small screens: the help screen and the destination picker of the split editor."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static

HELP = [
    ("Everywhere", [
        ("1 2 3 4", "topology, services, hosts, events"),
        ("w", "split editor (the selected service, or pick one)"),
        ("/", "filter services, hosts and events; esc clears"),
        ("r", "refresh now (the console refreshes every second)"),
        ("?", "this help"),
        ("q, ctrl+c", "quit"),
    ]),
    ("Topology and services", [
        ("↑ ↓ ← →", "select a service"),
        ("enter, click", "service detail: instances, routes, certificates, generations"),
    ]),
    ("Service detail", [
        ("w", "edit this service's split"),
        ("esc", "back"),
    ]),
    ("Split editor", [
        ("↑ ↓, click", "select a subset"),
        ("← → or - +", "weight -1 / +1"),
        ("shift+← → or [ ]", "weight -10 / +10"),
        ("0-9, backspace", "type the selected weight"),
        ("=", "give the stable subset the rest (total 100)"),
        ("c", "canary step: 10 → 25 → 50 → 100"),
        ("b", "roll back: 100% to the stable subset"),
        ("s", "mark the selected subset as the stable one"),
        ("a, enter", "apply (check-and-set on the stored table's index)"),
        ("r", "reload the stored split (after a conflict)"),
        ("esc", "close"),
    ]),
    ("Symbols (colour is never the only signal)", [
        ("✔", "healthy, success ≥ 99%"),
        ("▲", "degraded: some endpoints down, success < 99%"),
        ("✘", "failing: no healthy endpoint, success < 90%, refused, unreachable"),
        ("⊘", "ejected endpoints (outlier detection)"),
        ("?", "stale: the meshd cannot be reached, last known data shown"),
        ("·", "idle: no requests in the last 5 s, or an empty 0 % subset"),
    ]),
]


def help_text() -> Text:
    text = Text()
    for title, rows in HELP:
        if text:
            text.append("\n")
        text.append(title + "\n", style="bold underline")
        for keys, what in rows:
            text.append(f"  {keys:<18}", style="bold cyan")
            text.append(what + "\n")
    text.append("\nEdges: rate (req/s), success, p99 latency over the last 5 s, per subset leg;"
                "\nthe destination box shows each subset's weight and healthy/all endpoints.",
                style="dim")
    return text


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Static(help_text(), id="help-text")

    def on_click(self) -> None:
        self.dismiss()


class DestinationPicker(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, choices: list[str]) -> None:
        super().__init__()
        self.choices = choices

    def compose(self) -> ComposeResult:
        yield Static("Edit the split of which destination?", id="picker-title")
        yield OptionList(*self.choices, id="picker")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.choices[event.option_index])

    def action_cancel(self) -> None:
        self.dismiss(None)
