"""Driving the console headless: wait for a condition, open the split editor."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from textual.pilot import Pilot

from tui.app import MeshConsole
from tui.editor import SplitEditorScreen


async def until(pilot: Pilot[None], predicate: Callable[[], bool], within: float = 10.0,
                what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {within}s")
        await pilot.pause(0.05)


async def open_editor(app: MeshConsole, pilot: Pilot[None]) -> SplitEditorScreen:
    await pilot.press("w")
    await until(pilot, lambda: isinstance(app.screen, SplitEditorScreen), what="editor open")
    editor = app.screen
    assert isinstance(editor, SplitEditorScreen)
    await until(pilot, lambda: editor.draft is not None, what="stored split read")
    return editor


def console_errors(app: MeshConsole) -> list[str]:
    """The console's own errors it logged (a failed refresh, a view that could not be drawn)."""
    return [e.text for e in app.model.events if e.kind == "console" and e.severity == "error"]
