"""``meshd explain``: the proxy's own decision functions run over a daemon's ``/v1/state``."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import httpx
import pytest
from conftest import Farm

from meshd.cli import main
from meshd.config.routes import parse_routes, routes_to_data
from meshd.explain_command import explain, render
from meshd.proxy.matcher import RequestFacts

ROUTES = parse_routes({"destinations": {"payments": {
    "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
    "split": {"v1": 90, "v2": 10},
    "timeout": "3s",
    "retries": {"attempts": 2, "retry_on": ["5xx"]},
    "routes": [
        {"name": "admin", "match": {"path": {"prefix": "/admin"}, "method": "POST"}},
        {"name": "canary", "match": {"headers": {"x-canary": "1"}}, "split": {"v2": 100}},
    ],
    "policy": {"load_balancer": "least_request", "max_connections": 10,
               "outlier_detection": {"consecutive_5xx": 3}},
}}})


def _endpoint(node: str, version: str, healthy: bool = True, **extra: Any) -> dict[str, Any]:
    return {"node": node, "instance_id": f"payments-{version}", "address": "10.0.0.1",
            "port": 15001, "version": version, "healthy": healthy, **extra}


def _state(*endpoints: dict[str, Any]) -> dict[str, Any]:
    return {"ready": True, "generation": 7, "routes": routes_to_data(ROUTES),
            "destinations": {"payments": {"index": 3, "age_seconds": 0.1,
                                          "endpoints": list(endpoints)}}}


def _live(ejected: bool = False, active: int = 0) -> dict[str, Any]:
    return {"ejected": ejected, "ejection_remaining_seconds": 12.5 if ejected else 0.0,
            "ejections": 1 if ejected else 0, "ejection_reason": "5xx" if ejected else "",
            "active_requests": active}


STATE = _state(
    _endpoint("a", "v1", **_live(active=3)),
    _endpoint("b", "v1", **_live(ejected=True)),
    _endpoint("c", "v1", healthy=False, **_live()),
    _endpoint("d", "v2", **_live(ejected=True)),
)


def test_default_route_with_split_health_ejection_and_load() -> None:
    found = explain(STATE, "payments", RequestFacts("GET", "/pay"))
    assert found.route is not None and found.route.name == "default"
    assert [(r.route.name, r.matched, r.chosen) for r in found.reports] == [
        ("admin", False, False), ("canary", False, False), ("default", True, True)]
    v1, v2 = found.subsets
    assert (v1.name, v1.weight, [e.key for e in v1.usable]) == ("v1", 90, ["a/payments-v1"])
    assert v2.panic and [e.key for e in v2.usable] == ["d/payments-v2"]
    assert found.routable
    text = render(found)
    assert "3. default: MATCHED, chosen" in text
    # every check of a route tried is shown, not only the first that failed
    assert "FAIL path prefix '/admin' (got '/pay')" in text
    assert "FAIL method in POST (got GET)" in text
    assert "subset v1 (90%, version v1): 1 of 3 endpoints take requests" in text
    assert "b/payments-v1  10.0.0.1:15001  healthy  EJECTED 12.5s left (5xx, ejection 1)" \
        in text
    assert "c/payments-v1  10.0.0.1:15001  UNHEALTHY  in service  active 0" in text
    assert "> a/payments-v1  10.0.0.1:15001  healthy  in service  active 3" in text
    assert "every candidate is ejected: requests ignore ejection (panic)" in text
    assert "policy: least_request; max_connections 10" in text
    assert "route default: timeout 3s; retries 2 on 5xx" in text


def test_header_route_and_unreachable_subset() -> None:
    state = _state(_endpoint("a", "v1", **_live()))
    found = explain(state, "payments", RequestFacts("GET", "/", [("X-Canary", "1")]))
    assert found.route is not None and found.route.name == "canary"
    assert found.route.timeout == 3.0  # inherited, as the proxy does
    (v2,) = found.subsets
    assert not v2.usable and not found.routable
    assert "no healthy endpoint of payments in subset v2: its 100% of requests get a 503" \
        in render(found)


def test_unknown_destination_and_daemon_without_ejection_state() -> None:
    state = {"generation": 1, "routes": {"destinations": {}},
             "destinations": {"orders": {"endpoints": [
                 {"node": "a", "instance_id": "orders-v1", "address": "10.0.0.2",
                  "port": 15001, "version": "v1", "healthy": True}]}}}
    found = explain(state, "orders", RequestFacts("GET", "/"))
    assert found.route is None and found.routable
    text = render(found)
    assert "no routes for orders in the route table" in text
    assert "ejection ?" in text and "active ?" in text
    assert "does not report ejection state" in text


@pytest.fixture
def admin() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(STATE).encode()
            self.send_response(200 if self.path == "/v1/state" else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_command_reads_the_admin_api(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["explain", "payments", "--method", "post", "--path", "/admin/x",
                 "--header", "x-canary=1", "--admin", f"http://{admin}"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("POST /admin/x to payments with x-canary=1 "
                          "(route table generation 7)")
    assert "1. admin: MATCHED, chosen" in out
    assert "2. canary: not reached" in out


def test_command_exit_codes(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "payments", "--header", "x-canary=1", "--admin", admin]) == 0
    assert main(["explain", "payments", "--header", "nonsense", "--admin", admin]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err
    with socket.socket() as unused:  # bound, never listening: refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        assert main(["explain", "payments", "--admin", f"127.0.0.1:{port}",
                     "--timeout", "1"]) == 2
    assert "cannot read" in capsys.readouterr().err


async def test_explain_agrees_with_a_live_proxy(farm: Farm) -> None:
    """State as the admin API will serve it: the view's routes and endpoints, with the
    proxy's ``endpoint_states`` merged in per endpoint."""
    farm.apps["b1"].status = 500
    farm.set_endpoints(farm.endpoint("b1"), farm.endpoint("b2"))
    farm.set_routes({"split": {"v1": 100}, "policy": {"outlier_detection": {
        "consecutive_5xx": 1}}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        for _ in range(4):
            await client.get("/version")
    view = farm.view.current
    live = {(r["node"], r["instance_id"]): r
            for r in farm.a.proxy.endpoint_states()["payments"]}
    endpoints = [
        {"node": e.node, "instance_id": e.instance_id, "address": e.address, "port": e.port,
         "version": e.version, "healthy": e.healthy, **live[(e.node, e.instance_id)]}
        for e in view.endpoints["payments"].endpoints]
    state = {"generation": view.generation, "routes": routes_to_data(view.routes),
             "destinations": {"payments": {"index": 1, "endpoints": endpoints}}}
    found = explain(state, "payments", RequestFacts("GET", "/version"))
    (v1,) = found.subsets
    assert [e.node for e in v1.usable] == ["b2"]
    assert "b1/payments-b1" in render(found) and "EJECTED" in render(found)
