"""The service detail's and the split editor's charts follow the refreshes: driven headless on
the fixed data (tests/tui/tui_data.py), one observation per refresh, each asked for as ``r``
asks for it on the main screen."""

from __future__ import annotations

import asyncio
import re

from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import Static
from tui_data import NOW, ROUTES, ROUTES_INDEX, observations
from tui_pilot import console_errors, open_editor, until

from tui.app import MeshConsole
from tui.charts import SubsetCharts, SubsetSparks
from tui.detail import ServiceScreen
from tui.model import MeshModel
from tui.source import FixedSource, MemoryRouteStore
from tui.widgets import ServiceChosen


def console() -> MeshConsole:
    """The console on the recorded observations, from an empty model, refreshing on demand."""
    source = FixedSource(observations(), MemoryRouteStore(ROUTES, ROUTES_INDEX))
    return MeshConsole(source, interval=3600, clock=lambda: NOW, model=MeshModel())


async def refresh(app: MeshConsole, pilot: Pilot[None]) -> None:
    before = app.refreshes
    app.action_refresh_now()
    await until(pilot, lambda: app.refreshes == before + 1, what="a refresh")
    await pilot.pause()


def shown(app: MeshConsole, widget: str) -> list[str]:
    """What a chart widget shows, line by line, at its width."""
    static = app.screen.query_one(widget, Static)
    charts = static.content
    assert isinstance(charts, SubsetCharts | SubsetSparks)
    lines: list[Text] = charts.lines(static.content_size.width)
    return [line.plain.rstrip() for line in lines]


def success(line: str) -> float:
    found = re.findall(r"(\d+(?:\.\d+)?)%", line.split("success", 1)[-1])
    return float(found[0])


def test_detail_charts_update_when_new_samples_arrive() -> None:
    async def scenario() -> None:
        app = console()
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.refreshes == 1, what="the first refresh")
            app.post_message(ServiceChosen("payments"))
            await until(pilot, lambda: isinstance(app.screen, ServiceScreen)
                        and app.screen.is_mounted, what="the detail screen")
            # one scrape of each meshd: nothing to difference yet
            assert shown(app, "#charts") == ["no caller has sent requests to payments yet"]
            await refresh(app, pilot)
            second = shown(app, "#charts")
            assert second[1].startswith("v1 90% rate 18.0/s")
            assert second[5].startswith("v2 10% rate 2.00/s")
            assert success(second[5]) == 100
            for _ in range(3):
                await refresh(app, pilot)
            later = shown(app, "#charts")
            # v2 answers 503s from the fourth scrape on: its success rate falls, and its
            # success chart redraws on a lower scale (one 18 s column at 80x24 holds them all)
            assert success(later[5]) < 100
            assert second[8].split()[3] == "90%" and later[8].split()[3] == "50%"
            assert app.model.observations == 5 and console_errors(app) == []

    asyncio.run(scenario())


def test_editor_charts_update_when_new_samples_arrive() -> None:
    async def scenario() -> None:
        app = console()
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.refreshes == 1, what="the first refresh")
            await refresh(app, pilot)
            await open_editor(app, pilot)
            first = shown(app, "#editor-charts")
            assert first[1].split()[0] == "v1" and "18.0/s" in first[1]
            assert first[2].split()[0] == "v2" and success(first[2]) == 100
            for _ in range(3):
                await refresh(app, pilot)
            assert success(shown(app, "#editor-charts")[2]) < 100
            assert console_errors(app) == []

    asyncio.run(scenario())
