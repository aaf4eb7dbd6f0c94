"""Refreshes that land at awkward moments, on fixed data (tests/tui/tui_data.py), driven headless.

The console's worker refreshes whichever screen is on top every interval, whatever the operator
is doing. A pushed screen composes and mounts over several turns of the event loop, and the app
takes its screens down over several more when it closes; these tests step the loop one turn at a
time and refresh at every turn of those windows (what the worker does when its interval ends
there), then check that nothing raised, nothing was contained as a console error, and the
console still runs. Before the fix, each window crashed the console: ``NoMatches('#detail-title')``
(the detail screen not composed yet), ``ValueError('More values provided than there are
columns.')`` (composed, its tables' columns not added yet), ``NoMatches('#editor-title')`` (the
split editor likewise) and ``NoMatches('#status')`` (a poll answered while the console closes)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest
from textual.screen import Screen
from textual.widgets import DataTable
from tui_data import NOW, fixed_app, observations
from tui_pilot import console_errors, until

from tui.app import MeshConsole
from tui.detail import ServiceScreen
from tui.editor import SplitEditorScreen
from tui.source import FixedSource
from tui.widgets import ServiceChosen

MAX_TURNS = 500  # event-loop turns a screen may take to mount (it takes a few dozen)


async def refresh_every_turn(app: MeshConsole, screen_type: type[Screen[None]],
                             start: Callable[[Screen[None]], bool]) -> int:
    """Refresh at every turn of the loop from when ``start(screen)`` holds until the pushed
    ``screen_type`` is mounted; returns the number of refreshes made in that window."""
    refreshes = 0
    for _ in range(MAX_TURNS):
        screen = app.screen
        if isinstance(screen, screen_type):
            if screen.is_mounted:
                return refreshes
            if start(screen):
                app.refresh_views()
                refreshes += 1
        await asyncio.sleep(0)
    raise AssertionError(f"{screen_type.__name__} not mounted within {MAX_TURNS} turns")


def composed(screen: Screen[None]) -> bool:
    """Every widget of the screen is in place (its last table too); it is not mounted yet."""
    return bool(screen.query("#certs"))


@pytest.mark.parametrize(("window", "start"), [
    ("pushed, not composed yet", lambda screen: True),
    ("composed, not mounted yet", composed),
])
def test_refresh_while_the_detail_screen_starts(window: str,
                                               start: Callable[[Screen[None]], bool]) -> None:
    async def scenario() -> None:
        app = fixed_app()
        async with app.run_test(size=(80, 24)) as pilot:
            app.post_message(ServiceChosen("payments"))  # what enter or a click posts
            refreshes = await refresh_every_turn(app, ServiceScreen, start)
            assert refreshes > 0, f"no refresh landed while {window}"
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, ServiceScreen)
            assert screen.query_one("#instances").row_count == 2  # type: ignore[attr-defined]
            assert app.is_running and console_errors(app) == []

    asyncio.run(scenario())


def test_refresh_while_the_split_editor_starts() -> None:
    async def scenario() -> None:
        app = fixed_app()
        async with app.run_test(size=(80, 24)) as pilot:
            app.action_split()  # w
            refreshes = await refresh_every_turn(app, SplitEditorScreen, lambda s: True)
            assert refreshes > 0
            await until(pilot, lambda: isinstance(app.screen, SplitEditorScreen)
                        and app.screen.draft is not None, what="stored split read")
            assert app.is_running and console_errors(app) == []

    asyncio.run(scenario())


def test_refresh_while_the_console_closes() -> None:
    async def scenario() -> None:
        app = fixed_app()
        closing, closed = asyncio.Event(), asyncio.Event()
        raised: list[str] = []

        async def refresh_every_turn_while_closing() -> int:
            await closing.wait()
            turns = 0
            while not closed.is_set() and turns < MAX_TURNS * 10:
                try:
                    app.refresh_views()
                except Exception as exc:  # kept to assert on: this task's own would be lost
                    raised.append(repr(exc))
                    break
                turns += 1
                await asyncio.sleep(0)
            return turns

        refresher = asyncio.create_task(refresh_every_turn_while_closing())
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("2", "3")
            closing.set()
        # leaving run_test closed the console (and re-raised anything that crashed it)
        closed.set()
        turns = await refresher
        assert raised == []
        assert 0 < turns < MAX_TURNS * 10  # refreshed at every turn until it had closed
        assert app.return_code in (None, 0) and console_errors(app) == []

    asyncio.run(scenario())


def test_a_view_that_raises_is_contained_logged_and_shown() -> None:
    """A meshd answering a field of another type than the console expects (here an open
    connection count that is not a number) breaks the hosts view's refresh: the console logs it
    once in its events, shows it (a notification, the status line) and carries on."""
    async def scenario() -> None:
        recorded = observations()
        last = recorded[-1]
        odd = [dataclasses.replace(h, state={**h.state, "connections": {"inbound": "many"}})
               if h.state is not None and h.node == "host-a" else h for h in last.hosts]
        bad = dataclasses.replace(last, at=last.at + 1, hosts=tuple(odd))
        app = MeshConsole(FixedSource([*recorded, bad]), interval=0.05, clock=lambda: NOW)
        async with app.run_test(size=(80, 24), notifications=True) as pilot:
            await until(pilot, lambda: app.model.observations == len(recorded) + 1,
                        what="the odd answer read")
            await pilot.press("3")
            await until(pilot, lambda: app.view_errors > 0, what="the hosts view failing")
            await pilot.pause(0.3)  # several more refreshes fail the same way
            errors = console_errors(app)
            assert len(errors) == 1, errors  # logged once, not at every refresh
            assert "hosts view failed to refresh: ValueError(" in errors[0]
            toasts = [str(t.render()) for t in app.screen.query("Toast")]
            assert any("hosts view failed" in t for t in toasts), toasts
            assert "console bug" in str(app.query_one("#status").render())
            await pilot.press("2")  # the other views and the keys still work
            assert app.query_one("#services-table", DataTable).row_count == 4
            assert app.is_running

    asyncio.run(scenario())
