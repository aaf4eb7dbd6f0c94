"""The console against the real shop demo (`meshd up` as a child process, on a loopback block of
its own, registry ACLs on): in a real terminal (tmux: start `meshd tui` with no token, which
finds the operator's through the context `meshd up` recorded) the topology shows web →
payments; headless, with the operator's token, the split editor moves payments from 90/10 to
50/50, the registry holds the new table, every meshd takes it, and 1000 real checkouts split
~50/50, as the console itself measures from the meshds' metrics."""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import shlex
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from operator_testing import table_in
from textual.widgets import TabbedContent
from tmux_testing import tmux_server
from tui_pilot import console_errors, open_editor, until
from tui_processes import REPO, Running, ShopAddresses, derive_shop_mesh, start

from meshd.registry.config_store import ROUTES_KEY
from meshd.registry.consul import ConsulClient
from meshd.registry.operator_key import OperatorKey
from tui.app import MeshConsole
from tui.source import RegistrySource
from tui.views import build_graph, propagation

pytestmark = pytest.mark.e2e

REQUESTS = 1000
# 4 sigma of Binomial(1000, 0.5): 500 +- 4 * sqrt(1000 * 0.5 * 0.5) = 500 +- 63.2
V2_RANGE = range(437, 564)


@dataclass
class Shop:
    running: Running
    addresses: ShopAddresses
    run_dir: Path
    runtime_dir: Path   # the runner's $XDG_RUNTIME_DIR: its operator context is there

    @property
    def operator_token(self) -> str:
        return (self.run_dir / "operator" / "registry-token").read_text().strip()

    @property
    def operator(self) -> OperatorKey:
        """The operator certificate `meshd up` issued (its split edits are signed with it)."""
        directory = self.run_dir / "operator"
        return OperatorKey.from_files(directory / "dev.crt", directory / "dev.key")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    directory = tmp_path_factory.mktemp("tui-shop")
    mesh, addresses = derive_shop_mesh(directory)
    runtime_dir = directory / "runtime"
    running = start(["up", str(mesh), "--run-dir", str(directory / "run")], "meshd up: ready",
                    env={"XDG_RUNTIME_DIR": str(runtime_dir)})
    try:
        yield Shop(running, addresses, directory / "run", runtime_dir)
    finally:
        running.stop()


# -- a real terminal --------------------------------------------------------------------------


def test_topology_appears_in_a_real_terminal(shop: Shop) -> None:
    command = (f"env -u CONSUL_HTTP_TOKEN -u CONSUL_HTTP_TOKEN_FILE "
               f"XDG_RUNTIME_DIR={shlex.quote(str(shop.runtime_dir))} "
               f"{sys.executable} -m meshd tui --registry {shop.addresses.registry} "
               "--admin-port 15000")
    with tmux_server() as tmux:
        # wide enough for the shop's graph: gateway -> web -> payments -> bank
        tmux("new-session", "-d", "-s", "tui", "-x", "150", "-y", "30", "-c", str(REPO), command)
        screen = tmux.wait_for("payments", "tui")
        screen = tmux.wait_for("v2 ", "tui")  # the edge's second leg, once traffic views exist
        lines = screen.splitlines()
        assert any("web" in line and "├" in line for line in lines), screen
        legs = [line for line in lines if "▶" in line]
        assert any(" v1 " in line for line in legs) and any(" v2 " in line for line in legs), \
            screen
        assert any("payments" in line for line in lines) and "hosts 3/3" in screen, screen

        tmux("send-keys", "-t", "tui", "3")  # hosts view
        hosts = tmux.wait_for("host-c", "tui")
        assert "host-a" in hosts and "host-b" in hosts
        tmux("send-keys", "-t", "tui", "q")
        deadline = time.monotonic() + 10
        while tmux.has_session("tui"):
            assert time.monotonic() < deadline, "meshd tui did not quit on q"
            time.sleep(0.1)


# -- the split editor, end to end -------------------------------------------------------------


def checkouts(address: tuple[str, int], n: int) -> Counter[str]:
    versions: Counter[str] = Counter()
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        for _ in range(n):
            conn.request("GET", "/checkout")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, body[:200]
            versions[json.loads(body)["version"]] += 1
    finally:
        conn.close()
    return versions


def test_editor_moves_payments_from_90_10_to_50_50(shop: Shop) -> None:
    async def scenario() -> None:
        app = MeshConsole(RegistrySource(shop.addresses.registry, 15000,
                                         token=shop.operator_token, signer=shop.operator))
        async with app.run_test(size=(120, 40)) as pilot:
            def ready() -> bool:
                _, edges = build_graph(app.model)
                hosts = app.model.hosts.values()
                return (len(hosts) == 3 and all(h.reachable for h in hosts)
                        and any((e.source, e.destination) == ("web", "payments")
                                for e in edges))

            await until(pilot, ready, 20, "three meshds and web → payments")
            editor = await open_editor(app, pilot)
            assert editor.destination == "payments"
            assert editor.draft is not None and editor.draft.weights == {"v1": 90, "v2": 10}
            await pilot.press("5", "0", "down", "5", "0")
            assert editor.draft.weights == {"v1": 50, "v2": 50}
            await pilot.press("a")
            await until(pilot, lambda: editor.writes == 1, 10, "split written")

            async with ConsulClient(shop.addresses.registry, token=shop.operator_token) as consul:
                stored = (await consul.kv_get(ROUTES_KEY)).data
            assert stored is not None
            table = table_in(stored.value)
            assert table["destinations"]["payments"]["split"] == {"v1": 50, "v2": 50}
            assert editor.target == table
            await until(pilot, lambda: propagation(app.model, table).complete, 15,
                        "every meshd on the new table")
            await until(pilot, lambda: editor.baseline is not None, 5, "share baseline")

            versions = await asyncio.to_thread(checkouts, shop.addresses.front_door, REQUESTS)
            assert set(versions) <= {"v1", "v2"}
            assert versions["v2"] in V2_RANGE, f"v2 share {versions['v2']}/{REQUESTS}"

            # the console measures the same split from the meshds' /metrics
            def measured() -> dict[str, float]:
                assert editor.baseline is not None
                now = app.model.outbound_counts("payments")
                return {k: v - editor.baseline.get(k, 0.0) for k, v in now.items()}

            await until(pilot, lambda: sum(measured().values()) >= REQUESTS, 10,
                        "the console to see the checkouts")
            assert measured() == {"v1": versions["v1"], "v2": versions["v2"]}
            assert "measured share since then (1000 requests)" in editor.share_text().plain

    asyncio.run(scenario())


# -- navigating for a while, against the live mesh ------------------------------------------

NAVIGATIONS = 200
FAST_REFRESH = 0.2  # seconds: five refreshes a second land at every stage of every screen
PACES = (0.0, 0.0, 0.01, 0.02, 0.05, 0.2)  # pauses after a key, so refreshes land anywhere
# Tours through every screen and key, in a shuffled order. The editor's apply (a) is only
# pressed as it opens, with nothing changed: the walk never rewrites the demo's split.
TOURS = (
    ("1", "down", "right", "up", "left", "enter", "down", "up", "question_mark", "escape",
     "backspace"),
    ("2", "down", "down", "enter", "w", "a", "right", "left", "plus", "minus",
     "right_square_bracket", "left_square_bracket", "5", "0", "backspace", "equals_sign", "c",
     "b", "s", "up", "down", "r", "question_mark", "escape", "escape", "escape"),
    ("3", "down", "down", "down", "down", "up", "tab", "r"),
    ("4", "down", "up", "r"),
    ("slash", "p", "a", "y", "enter", "2", "3", "1", "slash", "backspace", "backspace",
     "backspace", "escape"),
    ("question_mark", "down", "up", "question_mark"),
    ("1", "w", "a", "down", "1", "0", "escape"),
    ("r",),
)


def where(app: MeshConsole) -> str:
    screen = app.screen
    if len(app.screen_stack) > 1:
        return type(screen).__name__
    if app.focused is not None and app.focused.id == "filter":
        return "filter"
    return str(app.query_one(TabbedContent).active)


def test_two_hundred_navigations_at_a_fast_refresh_never_crash(shop: Shop) -> None:
    """Every screen and key of the console, in tours shuffled by a seeded random walk with
    random pauses, against the live demo while it refreshes five times a second; then q quits
    it cleanly."""
    rng = random.Random(14)

    async def scenario() -> None:
        source = RegistrySource(shop.addresses.registry, 15000, token=shop.operator_token,
                                signer=shop.operator, timeout=FAST_REFRESH * 0.8)
        app = MeshConsole(source, interval=FAST_REFRESH)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: len(app.model.hosts) == 3 and app.model.registry
                        is not None, 20, "three meshds and the registry read")
            refreshes = app.refreshes
            visits: Counter[str] = Counter()
            pressed = 0

            async def press(key: str) -> None:
                nonlocal pressed
                visits[where(app)] += 1
                await pilot.press(key)
                pressed += 1
                await pilot.pause(rng.choice(PACES))
                assert app.is_running, f"the console stopped at {key!r} ({pressed} keys in)"

            while pressed < NAVIGATIONS:
                for tour in rng.sample(TOURS, len(TOURS)):
                    for key in tour[:NAVIGATIONS - pressed]:
                        await press(key)
                    while len(app.screen_stack) > 1 and pressed < NAVIGATIONS:
                        await press("escape")  # back to the main screen for the next tour
            assert pressed == NAVIGATIONS
            assert console_errors(app) == [] and app.view_errors == 0
            assert app.refreshes - refreshes >= 20, "too few refreshes landed during the walk"
            assert {"topology", "services", "hosts", "events", "filter", "ServiceScreen",
                    "SplitEditorScreen", "HelpScreen"} <= set(visits), visits
            while len(app.screen_stack) > 1:
                await pilot.press("escape")
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())
