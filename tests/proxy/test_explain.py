"""``meshd explain``: the proxy's own decision functions run over a daemon's ``/v1/state``."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import httpx
import pytest
import trio
from proxy_mesh_testing import Farm

from meshd.admin.state import DaemonState, build_state
from meshd.cli.main import main
from meshd.config.routes import parse_routes, routes_to_data
from meshd.explain.authz import choose_source
from meshd.explain.route import explain, render
from meshd.proxy.core.authz import DEFAULT_DENY
from meshd.proxy.core.matcher import RequestFacts

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


# -- authorization ------------------------------------------------------------------------------

RULES = [
    {"name": "no-admin", "action": "deny", "paths": ["/admin*"]},
    {"name": "web-pays", "action": "allow", "from": ["web"], "methods": ["GET", "POST"],
     "paths": ["/pay", "/pay/*"]},
    {"name": "mesh-reads", "action": "allow", "from": ["*"], "methods": ["GET"]},
]


def _protected(upstreams: tuple[tuple[str, str], ...] = (("web", "payments"),)
               ) -> dict[str, Any]:
    """STATE with ``RULES`` on payments, asked of a host whose local services call
    ``upstreams`` (service, destination)."""
    routes = routes_to_data(ROUTES)
    routes["destinations"]["payments"]["authorization"] = {"rules": RULES}
    return {**STATE, "node": "a", "trust_domain": "mesh.test", "routes": routes,
            "services": [{"name": s} for s in sorted({s for s, _ in upstreams})],
            "upstreams": [{"service": s, "destination": d, "local_address": "127.0.0.1",
                           "local_port": 15100 + i} for i, (s, d) in enumerate(upstreams)]}


PROTECTED = _protected()


@pytest.mark.parametrize(("source", "method", "target", "allowed", "rule", "shown"), [
    ("web", "POST", "/pay/7", True, "web-pays", [
        "caller: web (spiffe://mesh.test/svc/web), from --source",
        "  1. no-admin: deny from anyone paths /admin*: does not apply",
        "  2. web-pays: allow from web methods GET, POST paths /pay, /pay/*: APPLIES, allowed",
        "  3. mesh-reads: allow from any mesh service methods GET: not reached",
        "verdict: POST /pay/7 ALLOWED by rule 'web-pays'"]),
    ("web", "GET", "/%61dmin/../admin/x?y=1", False, "no-admin", [
        "  1. no-admin: deny from anyone paths /admin*: APPLIES, denied",
        "  2. web-pays: allow from web methods GET, POST paths /pay, /pay/*: not reached",
        "verdict: GET /%61dmin/../admin/x?y=1 (the rules see the path /admin/x) DENIED by "
        "rule 'no-admin': the meshd of payments answers 403"]),
    ("web", "DELETE", "/pay", False, DEFAULT_DENY, [
        "  3. mesh-reads: allow from any mesh service methods GET: does not apply",
        "verdict: DELETE /pay DENIED by the default deny (no rule applies): the meshd of "
        "payments answers 403"]),
    # a caller no rule names: only the rules for any mesh service, or none, let it in
    ("orders", "POST", "/pay", False, DEFAULT_DENY, [
        "caller: orders (spiffe://mesh.test/svc/orders), from --source; it does not call "
        "payments from a, and the verdict is the same from any host"]),
    ("orders", "GET", "/pay", True, "mesh-reads", [
        "  2. web-pays: allow from web methods GET, POST paths /pay, /pay/*: does not apply",
        "  3. mesh-reads: allow from any mesh service methods GET: APPLIES, allowed"]),
])
def test_authorization_verdict_names_the_deciding_rule(
        source: str, method: str, target: str, allowed: bool, rule: str,
        shown: list[str]) -> None:
    found = explain(PROTECTED, "payments", RequestFacts(method, target), source)
    verdict = found.authz.verdict
    assert verdict is not None and (verdict.allowed, verdict.rule) == (allowed, rule)
    assert found.routable and found.reaches_app is allowed
    lines = render(found).splitlines()
    assert "authorization of payments, enforced by its own meshd (first rule that applies " \
        "decides, else deny):" in lines
    for line in shown:
        assert line in lines


def test_no_rules_follow_the_mesh_default_policy() -> None:
    open_state = {**STATE, "routes": {**STATE["routes"], "default_policy": "allow"}}
    for source in (None, "orders"):
        found = explain(open_state, "payments", RequestFacts("DELETE", "/admin"), source)
        assert found.authz.verdict is not None and found.authz.verdict.allowed
        assert found.reaches_app
        assert render(found).endswith("authorization: payments has no rules and the mesh's "
                                      "default_policy is allow: its meshd lets every caller in\n")
    found = explain(STATE, "payments", RequestFacts("GET", "/"), "orders")
    assert found.authz.denied and not found.reaches_app
    assert render(found).count("default_policy is deny: its meshd refuses every caller (403)")


@pytest.mark.parametrize(("upstreams", "given", "source", "note"), [
    ((("web", "payments"), ("web", "ledger")), None, "web",
     "the one local service of a with payments as an upstream"),
    ((("web", "payments"), ("admin", "payments")), "admin", "admin", "from --source"),
    ((("web", "payments"), ("admin", "payments")), None, None,
     "local services of a calling payments: admin, web"),
    ((("web", "ledger"),), None, None, "no local service of a has payments as an upstream"),
])
def test_the_caller_defaults_to_the_one_local_service_calling_the_destination(
        upstreams: tuple[tuple[str, str], ...], given: str | None, source: str | None,
        note: str) -> None:
    assert choose_source(_protected(upstreams), "payments", given) == (source, note)


def test_without_a_caller_there_is_no_verdict_but_the_rules_are_shown() -> None:
    state = _protected((("web", "payments"), ("admin", "payments")))
    found = explain(state, "payments", RequestFacts("GET", "/admin"))
    assert found.authz.verdict is None
    assert found.reaches_app  # an unknown verdict is not a denial
    text = render(found)
    assert "  1. no-admin: deny from anyone paths /admin*\n" in text
    assert text.endswith("verdict: unknown, no caller (local services of a calling payments: "
                         "admin, web): pass --source SERVICE\n")


@dataclass
class AdminAPI:
    """A stand-in admin API serving ``state`` as ``/v1/state``."""

    address: str
    state: Mapping[str, Any] = field(default_factory=lambda: STATE)


@pytest.fixture
def admin() -> Iterator[AdminAPI]:
    api = AdminAPI("")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(api.state).encode()
            self.send_response(200 if self.path == "/v1/state" else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    api.address = f"127.0.0.1:{server.server_address[1]}"
    yield api
    server.shutdown()
    server.server_close()


def test_command_reads_the_admin_api(admin: AdminAPI,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["explain", "payments", "--method", "post", "--path", "/admin/x",
                 "--header", "x-canary=1", "--admin", f"http://{admin.address}"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("POST /admin/x to payments with x-canary=1 "
                          "(route table generation 7)")
    assert "1. admin: MATCHED, chosen" in out
    assert "2. canary: not reached" in out
    assert out.endswith("route table signed by: none in force (from none)\n")


def test_command_exit_codes(admin: AdminAPI, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--admin", admin.address]
    assert main(["explain", "payments", "--header", "x-canary=1", *where]) == 0
    assert main(["explain", "payments", "--header", "nonsense", *where]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err
    assert main(["explain", "payments", "--source", "Web!", *where]) == 2
    assert "--source 'Web!': not a service name" in capsys.readouterr().err
    with socket.socket() as unused:  # bound, never listening: refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        assert main(["explain", "payments", "--admin", f"127.0.0.1:{port}",
                     "--timeout", "1"]) == 3
    assert "cannot read" in capsys.readouterr().err


def test_command_exits_1_for_a_request_the_destination_denies(
        admin: AdminAPI, capsys: pytest.CaptureFixture[str]) -> None:
    admin.state = PROTECTED
    where = ["--admin", admin.address]
    assert main(["explain", "payments", "--path", "/admin", *where]) == 1  # caller: web
    assert "DENIED by rule 'no-admin': the meshd of payments answers 403" \
        in capsys.readouterr().out
    assert main(["explain", "payments", "--path", "/pay", "--method", "post", *where]) == 0
    assert main(["explain", "payments", "--path", "/pay", "--method", "post",
                 "--source", "orders", *where]) == 1
    assert "DENIED by the default deny" in capsys.readouterr().out


def test_command_prints_the_explanation_as_json(
        admin: AdminAPI, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["explain", "payments", "--path", "/pay", "--admin", admin.address,
                 "-o", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert (code, doc["exit_code"], doc["format"]) == (0, 0, "meshd.explain/1")
    assert doc["admin"] == f"http://{admin.address}" and doc["service"] == "payments"
    assert doc["request"] == {"method": "GET", "target": "/pay", "path": "/pay", "headers": {}}
    assert doc["generation"] == 7
    assert [(r["name"], r["matched"], r["chosen"]) for r in doc["routes"]] == [
        ("admin", False, False), ("canary", False, False), ("default", True, True)]
    assert {"condition": "path prefix '/admin'", "passed": False, "actual": "'/pay'"} \
        in doc["routes"][0]["checks"]
    assert doc["route"] == {"name": "default", "timeout_seconds": 3.0,
                            "split": {"v1": 90, "v2": 10}}
    assert doc["policy"] == {"load_balancer": "least_request"}
    v1, v2 = doc["subsets"]
    assert (v1["name"], v1["weight"], v1["version"], v1["usable"]) == ("v1", 90, "v1", 1)
    assert [(e["node"], e["healthy"], e["ejected"], e["usable"], e["active_requests"])
            for e in v1["endpoints"]] == [("a", True, False, True, 3),
                                          ("b", True, True, False, 0),
                                          ("c", False, False, False, 0)]
    assert v1["endpoints"][1]["ejection_remaining_seconds"] == 12.5
    assert v2["panic"] is True and v2["why"].startswith("every candidate is ejected")
    assert doc["routable"] is True and doc["reaches_app"] is True
    assert doc["routes_signed"] is None


def test_command_prints_a_denial_as_json(admin: AdminAPI,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    admin.state = PROTECTED
    code = main(["explain", "payments", "--path", "/admin", "--admin", admin.address,
                 "--output", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert (code, doc["exit_code"]) == (1, 1)
    authz = doc["authorization"]
    assert (authz["source"], authz["spiffe_id"]) == ("web", "spiffe://mesh.test/svc/web")
    assert authz["verdict"] == {"allowed": False, "rule": "no-admin"} and authz["denied"]
    assert [(r["name"], r["action"], r["applies"]) for r in authz["rules"]] == [
        ("no-admin", "deny", True), ("web-pays", "allow", None), ("mesh-reads", "allow", None)]
    assert doc["routable"] is True and doc["reaches_app"] is False


def _admin_state(farm: Farm) -> dict[str, Any]:
    """Host a's ``/v1/state`` as its admin API serves it (``build_state``, through JSON)."""
    state = build_state(config=farm.a.proxy.config, view=farm.view.current,
                        state=DaemonState(), now_monotonic=trio.current_time(),
                        now_wall=time.time(), process={}, registry_url="",
                        endpoint_states=farm.a.proxy.endpoint_states())
    loaded: dict[str, Any] = json.loads(json.dumps(state))
    return loaded


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
    found = explain(_admin_state(farm), "payments", RequestFacts("GET", "/version"))
    (v1,) = found.subsets
    assert [e.node for e in v1.usable] == ["b2"]
    assert "b1/payments-b1" in render(found) and "EJECTED" in render(found)


async def test_explain_authorization_agrees_with_a_live_proxy(farm: Farm) -> None:
    """The route table (with payments' rules) in force on every host, as the registry puts it:
    what explain on host a says the destination's meshd decides is what it does."""
    table = parse_routes({"destinations": {"payments": {
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "split": {"v1": 100},
        "authorization": {"rules": [
            {"name": "no-admin", "action": "deny", "paths": ["/admin*"]},
            {"name": "web-reads", "action": "allow", "from": ["web"], "methods": ["GET"]},
        ]}}}})
    for view in (farm.view, *(h.proxy.view for h in farm.hosts.values())):
        view.set_routes(table)
    state = _admin_state(farm)
    cases = [("GET", "/version", "web-reads"), ("GET", "/%61dmin/x", "no-admin"),
             ("POST", "/version", DEFAULT_DENY)]
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        for method, target, rule in cases:
            found = explain(state, "payments", RequestFacts(method, target))
            assert found.authz.source == "web"  # host a's one service calling payments
            verdict = found.authz.verdict
            assert verdict is not None and verdict.rule == rule
            status = (await client.request(method, target)).status_code
            assert (status == 403) is found.authz.denied is (not found.reaches_app), \
                (method, target, status, render(found))
    assert farm.apps["b1"].requests + farm.apps["b2"].requests == 1  # only the GET got in


FAILOVER_ROUTES = parse_routes({"destinations": {"payments": {
    "subsets": {"v1": {"version": "v1", "failover": ["v2"]},
                "v2": {"version": "v2", "failover": ["v1"]}},
    "split": {"v1": 90, "v2": 10},
    "policy": {"locality": ["zone"]},
}}})


def _zoned(node: str, version: str, zone: str, healthy: bool = True) -> dict[str, Any]:
    return _endpoint(node, version, healthy, labels={"zone": zone}, **_live())


def test_a_subset_without_healthy_endpoints_shows_its_failover_and_locality() -> None:
    state = {"generation": 3, "labels": {"zone": "z1"}, "routes": routes_to_data(FAILOVER_ROUTES),
             "destinations": {"payments": {"endpoints": [
                 _zoned("b", "v1", "z1", healthy=False), _zoned("c", "v2", "z2"),
                 _zoned("d", "v2", "z1")]}}}
    found = explain(state, "payments", RequestFacts("POST", "/pay"))
    v1, v2 = found.subsets
    assert (v1.failover_to, [e.node for e in v1.usable]) == ("v2", ["d"])
    assert (v2.failover_to, [e.node for e in v2.usable]) == (None, ["d"])
    assert found.routable
    text = render(found)
    assert ("subset v1 (90%, version v1): no healthy, admitted endpoint: its requests fail "
            "over to subset v2 (failover order: v2), where 1 endpoint(s) take them") in text
    assert "  failover subset v2:\n" in text
    assert "   > d/payments-v2  10.0.0.1:15001  healthy  in service  active 0  zone=z1" in text
    assert ("  locality on zone (this host: zone=z1): requests go to the 1 healthy "
            "endpoint(s) with the same zone as this host") in text
    assert ("  fails over to v1 (in that order) while it has no healthy, admitted endpoint, "
            "or once a retry has tried them all") in text
    assert "no retries declared: a request that never reached an app is tried on up to 2 " \
        "other endpoints" in text
    assert "policy: round_robin; locality on zone" in text
