"""The split editor driven headless (``run_test`` and a pilot): live validation, the warning
that must be confirmed, canary steps and roll back, and check-and-set against a real embedded
registry (a `meshd registry serve` child process): a conflicting change by someone else is shown
and nothing is overwritten.

Textual runs on asyncio; each test runs its scenario with ``asyncio.run`` (trio's plugin is
kept away from tests/tui by tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from operator_testing import table_in, throwaway_operator
from tui_data import ROUTES, ROUTES_INDEX, fixed_app
from tui_pilot import open_editor, until
from tui_processes import start_registry

from meshd.config.routes import parse_routes
from meshd.registry.config_store import ROUTES_KEY, RouteConfigStore, encode_routes
from meshd.registry.consul import ConsulClient
from tui.editor import SplitEditorScreen
from tui.source import MemoryRouteStore


def body(editor: SplitEditorScreen) -> str:
    return str(editor.query_one("#editor-body").render())


def result(editor: SplitEditorScreen) -> str:
    return editor.result.plain


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


# -- against a store in memory --------------------------------------------------------------------


def test_validation_confirmation_step_and_rollback() -> None:
    store = MemoryRouteStore(ROUTES, ROUTES_INDEX, signer=throwaway_operator())

    async def scenario() -> None:
        app = fixed_app(store)
        async with app.run_test(size=(100, 32)) as pilot:
            editor = await open_editor(app, pilot)
            assert editor.destination == "payments"
            assert editor.draft is not None and editor.draft.weights == {"v1": 90, "v2": 10}
            await pilot.press("3")
            assert "weights total 13, must total 100 (add 87)" in body(editor)
            await pilot.press("a")
            assert "not applied: weights total 13" in result(editor) and store.writes == 0

            await pilot.press("c")  # canary step: v2 10 -> 25, the stable v1 gets the rest
            assert editor.draft.weights == {"v1": 75, "v2": 25}
            assert "preview: v1 90→75, v2 10→25" in body(editor)
            await pilot.press("a")  # v2 has no healthy endpoint: confirm first
            assert "press a again" in result(editor) and store.writes == 0
            await pilot.press("a")
            await until(pilot, lambda: editor.writes == 1, what="write")
            stored = await store.read()
            assert stored.data["destinations"]["payments"]["split"] == {"v1": 75, "v2": 25}
            assert stored.modify_index == ROUTES_INDEX + 1
            assert "written" in result(editor) and f"index {ROUTES_INDEX} → 43" in result(editor)

            await pilot.press("b")  # roll back to the stable subset: no warning for v2 at 0
            assert editor.draft.weights == {"v1": 100, "v2": 0}
            await pilot.press("a")
            await until(pilot, lambda: editor.writes == 2, what="second write")
            stored = await store.read()
            assert stored.data["destinations"]["payments"]["split"] == {"v1": 100, "v2": 0}
            assert any("split of payments written: v1=100 v2=0" in e.text
                       for e in app.model.events)
            await pilot.press("escape")
            assert not isinstance(app.screen, SplitEditorScreen)

    run(scenario)


def test_mouse_selects_a_subset_row_and_buttons_act() -> None:
    async def scenario() -> None:
        app = fixed_app()
        async with app.run_test(size=(100, 32)) as pilot:
            editor = await open_editor(app, pilot)
            assert editor.draft is not None and editor.draft.selected == "v1"
            await pilot.click("#editor-body", offset=(4, 2))  # the second subset row
            assert editor.draft.selected == "v2"
            await pilot.press("4", "0")
            await pilot.click("#rollback")
            assert editor.draft.weights == {"v1": 100, "v2": 0}
            await pilot.click("#close")
            assert not isinstance(app.screen, SplitEditorScreen)

    run(scenario)


# -- check-and-set against a real registry --------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    running, url = start_registry(tmp_path_factory.mktemp("tui-registry"))
    try:
        yield url
    finally:
        running.stop()


TABLE = parse_routes(ROUTES, "test")


def stored_split(raw: bytes) -> dict[str, int]:
    return dict(table_in(raw)["destinations"]["payments"]["split"])


def test_conflicting_change_is_shown_and_nothing_is_overwritten(registry: str) -> None:
    async def scenario() -> None:
        async with ConsulClient(registry) as consul, ConsulClient(registry) as other:
            await consul.kv_delete(ROUTES_KEY)
            assert await consul.kv_put(ROUTES_KEY, encode_routes(TABLE), cas=0)
            app = fixed_app(RouteConfigStore(consul, signer=throwaway_operator()))
            async with app.run_test(size=(100, 32)) as pilot:
                editor = await open_editor(app, pilot)
                assert editor.base is not None
                first_index = editor.base.modify_index
                await pilot.press("c")  # 75/25 in the editor...

                # ...while another operator changes the split (with check-and-set too)
                theirs = json.loads(encode_routes(TABLE))
                theirs["destinations"]["payments"]["split"] = {"v1": 70, "v2": 30}
                assert await other.kv_put(ROUTES_KEY, encode_routes(parse_routes(theirs, "test")),
                                          cas=first_index)

                await pilot.press("a", "a")  # confirm the unhealthy-v2 warning, apply
                await until(pilot, lambda: editor.conflicts == 1, what="conflict")
                assert editor.writes == 0
                text = result(editor)
                assert "conflict: the stored route table changed since it was read" in text
                assert "stored now: payments v1=70 v2=30" in text and "yours: v1=75 v2=25" in text
                stored = (await consul.kv_get(ROUTES_KEY)).data
                assert stored is not None and stored_split(stored.value) == {"v1": 70, "v2": 30}
                assert any("changed by someone else" in e.text for e in app.model.events)

                await pilot.press("a", "a")  # applying again without reloading: still refused
                await until(pilot, lambda: editor.conflicts == 2, what="second conflict")

                await pilot.press("r")  # reload: start again from what is stored now
                await until(pilot, lambda: editor.base is not None
                            and editor.base.modify_index == stored.modify_index, what="reload")
                assert editor.draft is not None
                assert editor.draft.weights == {"v1": 70, "v2": 30}
                await pilot.press("c", "a", "a")  # canary 30 -> 50
                await until(pilot, lambda: editor.writes == 1, what="write after reload")
                after = (await consul.kv_get(ROUTES_KEY)).data
                assert after is not None and stored_split(after.value) == {"v1": 50, "v2": 50}
                assert after.modify_index > stored.modify_index

    run(scenario)


def test_unreadable_registry_is_explained(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ConsulClient("http://127.0.0.1:9") as consul:
            app = fixed_app(RouteConfigStore(consul, signer=throwaway_operator()))
            async with app.run_test(size=(100, 32)) as pilot:
                await pilot.press("w")
                await until(pilot, lambda: isinstance(app.screen, SplitEditorScreen))
                editor = app.screen
                assert isinstance(editor, SplitEditorScreen)
                await until(pilot, lambda: "cannot edit payments" in result(editor),
                            what="error shown")
                assert editor.draft is None

    run(scenario)
