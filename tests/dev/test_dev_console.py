"""What `meshd up` shows on its terminal: events, not every line (the logs keep those); access
log lines counted, never shown; start-up warnings held until the start fails or the child exits;
route tables summarised; a status line on a terminal only."""

from __future__ import annotations

import io

from meshd.config.routes import parse_routes, routes_to_data
from meshd.dev import childlog
from meshd.dev.console import Console
from meshd.dev.statusline import Counts, status_text

STAMP = "2026-12-04 22:00:47,548"
ACCESS_TEXT = (f"{STAMP} INFO meshd.access: outbound web -> payments route=default subset=v1 "
               "endpoint=host-b/payments-host-b POST /pay 200 8.1ms id=badbb79e")
WAITING = f"{STAMP} WARNING meshd.registry.watch: cannot reach the registry: connection refused"
ROUTES = {"payments": {"subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
                       "split": {"v1": 90, "v2": 10},
                       "routes": [{"name": "canary", "match": {"headers": {"x-canary":
                                                                           {"exact": "1"}}},
                                   "split": {"v2": 100}}]}}


def compact(out: io.StringIO, *, live: bool = False) -> Console:
    console = Console(out, color=False, verbose=False, live=live)
    console.register("meshd host-a")
    return console


def test_log_lines_are_parsed_and_app_lines_are_not() -> None:
    line = childlog.parse(WAITING)
    assert line == childlog.LogLine("WARNING", "meshd.registry.watch",
                                    "cannot reach the registry: connection refused")
    assert line.loud and not line.is_access
    assert childlog.parse("web v1: listening on http://127.0.0.1:8080") is None
    assert childlog.parse("Traceback (most recent call last):") is None


def test_access_lines_text_and_json() -> None:
    text = childlog.parse(ACCESS_TEXT)
    assert text is not None and text.is_access
    assert childlog.access_request(text.message) == childlog.Request(outbound=True, failed=False)
    inbound_503 = ACCESS_TEXT.replace("outbound", "inbound").replace(" 200 ", " 503 ")
    parsed = childlog.parse(inbound_503)
    assert parsed is not None
    assert childlog.access_request(parsed.message) == childlog.Request(False, True)
    assert childlog.access_request('{"direction":"outbound","status":502}') == \
        childlog.Request(True, True)
    assert childlog.access_request("garbage") is None


def test_a_route_table_is_one_short_line() -> None:
    table = parse_routes({"destinations": ROUTES})
    data = routes_to_data(table)["destinations"]
    assert childlog.summarise_routes(data) == "payments: v1 90% / v2 10% (+1 match route)"
    assert childlog.summarise_routes({}) == "no routes"
    message = (f"{STAMP} INFO meshd.daemon.route_table: route table generation 2 applied from "
               "the registry (version 17 signed by spiffe://shop.mesh/operator/dev at "
               f"2026-12-04T22:00:46.703843Z): {data!r}")
    line = childlog.parse(message)
    assert line is not None
    applied = childlog.routes_applied(line)
    assert applied == childlog.RoutesApplied("17", "spiffe://shop.mesh/operator/dev",
                                             "registry", "payments: v1 90% / v2 10% "
                                             "(+1 match route)")


def test_compact_terminal_shows_events_only() -> None:
    out = io.StringIO()
    console = compact(out)
    console.child_line("meshd host-a", f"{STAMP} INFO meshd.daemon.lifetime: admin API up")
    console.child_line("meshd host-a", WAITING)          # expected while the registry starts
    console.child_line("web v1", "web v1: listening")
    assert out.getvalue() == ""
    console.ready()
    error = f"{STAMP} ERROR meshd.daemon.health: local service web is critical"
    console.child_line("meshd host-a", error)
    assert out.getvalue().splitlines() == [
        "(1 warning(s) while the mesh was starting; expected while the registry and CA came "
        "up; the logs have them)",
        "meshd up: ready",
        f"[meshd host-a] {error}"]


def test_a_failed_start_shows_what_was_held() -> None:
    out = io.StringIO()
    console = compact(out)
    console.child_line("meshd host-a", WAITING)
    console.start_failed()
    assert out.getvalue().splitlines() == [f"[meshd host-a] {WAITING}"]


def test_a_child_exiting_before_ready_shows_at_once_with_its_last_lines() -> None:
    out = io.StringIO()
    console = compact(out)
    console.child_line("meshd host-a", WAITING)
    tail = ["Traceback (most recent call last):", "SystemExit: 3"]
    console.child_exited("meshd host-a", "meshd host-a exited (exit code 3) after 0.2s; "
                         "restarting it in 0.05s", [WAITING, *tail])
    assert out.getvalue().splitlines() == [
        "meshd up: meshd host-a exited (exit code 3) after 0.2s; restarting it in 0.05s",
        f"[meshd host-a] {WAITING}",
        "[meshd host-a] Traceback (most recent call last):",
        "[meshd host-a] SystemExit: 3"]


def test_a_new_route_version_is_said_once_and_the_start_ones_not_at_all() -> None:
    out = io.StringIO()
    console = compact(out)

    def applied(version: int) -> str:
        return (f"{STAMP} INFO meshd.daemon.route_table: route table generation 1 applied from "
                f"the registry (version {version} signed by spiffe://t/operator/dev at x): "
                f"{ROUTES!r}")

    console.child_line("meshd host-a", applied(1))
    console.ready()
    for label in ("meshd host-a", "meshd host-b"):
        console.child_line(label, applied(1))
        console.child_line(label, applied(2))
    assert out.getvalue().splitlines()[1:] == [
        "meshd up: routes version 2 (signed by spiffe://t/operator/dev) applied by meshd "
        "host-a: payments: v1 90% / v2 10% (+1 match route)"]


def test_requests_are_counted_where_they_enter_the_mesh() -> None:
    console = compact(io.StringIO())
    for outbound, failed in ((True, False), (False, False), (True, True), (False, True)):
        console.request(childlog.Request(outbound, failed))
    assert (console.requests, console.failed) == (2, 1)


def test_the_status_line_stays_last_on_a_terminal() -> None:
    out = io.StringIO()
    console = compact(out, live=True)
    console.ready()
    console.status("1.0 req/s")
    console.say("restarted web v1")
    assert out.getvalue() == ("meshd up: ready\n\r\033[K1.0 req/s"
                              "\r\033[Kmeshd up: restarted web v1\n1.0 req/s")
    console.clear_status()
    console.say("stopped")
    assert out.getvalue().endswith("1.0 req/s\r\033[Kmeshd up: stopped\n")


def test_no_status_line_off_a_terminal() -> None:
    out = io.StringIO()
    console = Console(out, color=False, verbose=False)   # a StringIO is no terminal
    console.status("1.0 req/s")
    assert out.getvalue() == ""


def test_status_text() -> None:
    assert status_text([("registry", "running"), ("web v1", "waiting to restart")],
                       Counts(0.0, 10, 0), Counts(2.0, 30, 1)) == (
        "10.0 req/s · 30 requests, 1 failed · 1/2 processes running · web v1 waiting to restart")
