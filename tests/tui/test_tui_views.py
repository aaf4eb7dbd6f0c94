"""The main screen driven headless on fixed data: mouse, filter, refreshing, detail, quit."""

from __future__ import annotations

import asyncio
import time

from textual.widgets import DataTable, Tabs
from tui_data import NOW, STEPS, fixed_app, observations
from tui_pilot import until

from tui.app import MeshConsole
from tui.detail import ServiceScreen
from tui.observe import Observation
from tui.screens import HelpScreen
from tui.source import FixedSource
from tui.widgets import TopologyCanvas


def test_clicking_a_service_box_opens_its_detail() -> None:
    async def scenario() -> None:
        app = fixed_app()
        async with app.run_test(size=(140, 40)) as pilot:
            canvas = app.query_one(TopologyCanvas)
            await until(pilot, lambda: canvas.drawing is not None and canvas.drawing.graph)
            assert canvas.drawing is not None
            box = next(h for h in canvas.drawing.hits if h.service == "payments")
            await pilot.click(TopologyCanvas, offset=(box.x0 + 2, box.y0 + 1))
            await until(pilot, lambda: isinstance(app.screen, ServiceScreen), what="detail")
            assert isinstance(app.screen, ServiceScreen) and app.screen.service == "payments"
            instances = app.screen.query_one("#instances", DataTable)
            assert instances.row_count == 2
            await pilot.press("escape")
            assert not isinstance(app.screen, ServiceScreen)

    asyncio.run(scenario())


def test_tabs_filter_help_and_quit() -> None:
    async def scenario() -> None:
        app = fixed_app()
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.click(Tabs, offset=(14, 0))  # "2 Services"
            await until(pilot, lambda: app.query_one("#views").active == "services")
            table = app.query_one("#services-table", DataTable)
            assert table.row_count == 4
            await pilot.press("slash", "p", "a", "y")
            assert app.filter_text == "pay" and table.row_count == 1
            await pilot.press("escape")
            assert app.filter_text == "" and table.row_count == 4
            await pilot.press("3")
            hosts = app.query_one("#hosts-table", DataTable)
            row = [str(c) for c in hosts.get_row("10.0.0.15:15000")]
            assert "✘ timed out · data 3s old" in row  # why, and the last known data's age
            await pilot.press("down", "down", "down", "down")  # host-e: its reason in full
            detail = str(app.query_one("#host-detail").render())
            assert "host-e 10.0.0.15:15000 ✘ unreachable: timed out" in detail, detail
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape", "q")
        assert app.return_code == 0

    asyncio.run(scenario())


class SlowSource(FixedSource):
    """Answers the first poll at once, then hangs as a dead network would."""

    async def poll(self) -> Observation:
        if self._next:
            await asyncio.sleep(60)
        return await super().poll()


def test_refreshing_never_blocks_keys() -> None:
    async def scenario() -> None:
        app = MeshConsole(SlowSource(observations()), interval=0.05, clock=lambda: NOW)
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: app.model.observations == 1, what="first observation")
            await pilot.pause(0.2)  # the second poll is now hanging
            started = time.monotonic()
            for view, name in zip("234", ("services", "hosts", "events"), strict=True):
                await pilot.press(view)
                assert app.query_one("#views").active == name
            assert time.monotonic() - started < 10  # seconds even on a loaded machine
            assert app.query_one("#hosts-table", DataTable).row_count == 5

    asyncio.run(scenario())


def test_refreshes_follow_the_source() -> None:
    async def scenario() -> None:
        app = MeshConsole(FixedSource(observations()), interval=0.05, clock=lambda: NOW)
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: app.model.observations == STEPS, what="all observed")
            assert app.refreshes >= STEPS

    asyncio.run(scenario())
