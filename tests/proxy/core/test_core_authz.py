"""Inbound authorization: the pure rule evaluation (tables), its config, and the inbound
listener enforcing it with real mTLS identities, live (a changed rule applies to connections
already open: Consul #6977)."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from proxy_mesh_testing import Mesh
from proxy_testing import TD, client_context, read_until_eof, sample

from meshd.config.routes import parse_routes, routes_to_data
from meshd.config.schema import Authorization, AuthorizationRule, AuthzAction
from meshd.errors import ConfigError
from meshd.proxy.core.authz import DEFAULT_DENY, Caller, Verdict, authorize, normalize_path

ALLOW, DENY = AuthzAction.ALLOW, AuthzAction.DENY
WEB = Caller("web")
PLAIN = Caller("unknown", authenticated=False)

RULES = Authorization((
    AuthorizationRule("no-admin", DENY, paths=("/admin*",)),
    AuthorizationRule("web-pays", ALLOW, sources=("web",), paths=("/pay", "/pay/*"),
                      methods=("POST", "GET")),
    AuthorizationRule("health", ALLOW, paths=("/healthz",), methods=("GET",)),
    AuthorizationRule("mesh-reads", ALLOW, sources=("*",), methods=("GET",)),
))


@pytest.mark.parametrize(("caller", "method", "path", "verdict"), [
    (WEB, "POST", "/pay", Verdict(True, "web-pays")),
    (WEB, "GET", "/pay/123", Verdict(True, "web-pays")),
    (WEB, "POST", "/payx", Verdict(False, DEFAULT_DENY)),  # exact, and /pay/* needs the slash
    (WEB, "DELETE", "/pay", Verdict(False, DEFAULT_DENY)),
    (WEB, "GET", "/admin", Verdict(False, "no-admin")),  # first rule wins over later allows
    (WEB, "GET", "/admin/users", Verdict(False, "no-admin")),
    (Caller("orders"), "POST", "/pay", Verdict(False, DEFAULT_DENY)),
    (Caller("orders"), "GET", "/anything", Verdict(True, "mesh-reads")),
    (PLAIN, "GET", "/anything", Verdict(False, DEFAULT_DENY)),  # "*" means authenticated
    (PLAIN, "GET", "/healthz", Verdict(True, "health")),  # no `from`: any caller at all
    (WEB, None, None, Verdict(False, DEFAULT_DENY)),  # TCP: rules with paths/methods skip
])
def test_rules_first_applying_decides(caller: Caller, method: str | None, path: str | None,
                                      verdict: Verdict) -> None:
    assert authorize(RULES, caller, method, path) == verdict


def test_no_rules_allow_everyone_and_tcp_rules() -> None:
    assert authorize(None, PLAIN, "DELETE", "/x").allowed
    tcp = Authorization((AuthorizationRule("web", ALLOW, sources=("web",)),))
    assert authorize(tcp, WEB) == Verdict(True, "web")
    assert authorize(tcp, Caller("orders")) == Verdict(False, DEFAULT_DENY)


@pytest.mark.parametrize(("target", "path"), [
    (b"/", "/"), (b"/a/b?x=/admin", "/a/b"), (b"/a//b", "/a/b"), (b"/a/./b/../c", "/a/c"),
    (b"/%61dmin", "/admin"), (b"/admin%2Fx", "/admin/x"), (b"/public/../admin", "/admin"),
    (b"/..", "/"), (b"/a/", "/a/"), (b"/a\\b", "/a/b"), (b"http://h:1/p/q", "/p/q"),
    (b"*", "*"),
])
def test_paths_are_compared_in_normal_form(target: bytes, path: str) -> None:
    assert normalize_path(target) == path


# -- config ---------------------------------------------------------------------------------------

def _routes(authorization: Any) -> dict[str, Any]:
    return {"destinations": {"payments": {"authorization": authorization}}}


def test_authorization_config_round_trips() -> None:
    table = parse_routes(_routes({"rules": [
        {"name": "web", "action": "allow", "from": ["web", "*"], "paths": ["/pay*", "/x"],
         "methods": ["POST"]},
        {"action": "deny"},
    ]}))
    dest = table.get("payments")
    assert dest is not None and dest.authorization is not None
    assert [r.name for r in dest.authorization.rules] == ["web", "rules[1]"]
    assert parse_routes(routes_to_data(table)) == table


@pytest.mark.parametrize(("authorization", "where", "reason"), [
    ({"rules": []}, "authorization.rules", "empty: write rules, or leave authorization out "
     "for the mesh's default_policy"),
    ({"rules": [{"action": "permit"}]}, "authorization.rules[0].action",
     "must be one of allow, deny, got 'permit'"),
    ({"rules": [{"name": "a"}]}, "authorization.rules[0].action", "required key is missing"),
    ({"rules": [{"action": "allow", "paths": ["admin"]}]}, "authorization.rules[0].paths",
     "'admin': a path starts with '/' (or is \"*\")"),
    ({"rules": [{"action": "allow", "paths": ["/a*b"]}]}, "authorization.rules[0].paths",
     "'/a*b': '*' only at the end (a prefix)"),
    ({"rules": [{"action": "allow", "methods": ["get"]}]}, "authorization.rules[0].methods",
     "invalid method 'get' (upper case, like GET)"),
    ({"rules": [{"action": "allow", "from": ["Web!"]}]}, "authorization.rules[0].from",
     "invalid service name 'Web!' (or \"*\" for any mesh service)"),
    ({"rules": [{"action": "allow", "from": []}]}, "authorization.rules[0].from",
     "empty: leave it out to put no condition on it"),
    ({"rules": [{"name": "a", "action": "allow"}, {"name": "a", "action": "deny"}]},
     "authorization.rules[1].name", "rule name 'a' used twice"),
    ({"rule": []}, "authorization.rule", "unknown key (expected one of: rules)"),
])
def test_authorization_config_problems(authorization: Any, where: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_routes(_routes(authorization), "routes.toml")
    assert f"routes.toml: destinations.payments.{where}: {reason}" in [
        str(p) for p in info.value.problems]


# -- enforced by the inbound listener --------------------------------------------------------------

def _protect(mesh: Mesh, service: str, rules: list[dict[str, Any]]) -> None:
    """Put ``rules`` in force on host b (payments v1, ledger), as a route table reload would."""
    mesh.b.proxy.view.set_routes(parse_routes(
        {"destinations": {service: {"authorization": {"rules": rules}}}}))


async def test_denied_request_is_403_logged_with_the_rule_and_counted(
        mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    mesh.set_payments((("v1", 100), ("v2", 0)))
    _protect(mesh, "payments", [
        {"name": "no-admin", "action": "deny", "paths": ["/admin*"]},
        {"name": "web", "action": "allow", "from": ["web"], "methods": ["GET"]},
    ])
    caplog.set_level(logging.WARNING, "meshd.proxy.inbound")
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        assert (await client.get("/version")).status_code == 200
        denied = await client.get("/%61dmin/x")
        assert denied.status_code == 403
        assert denied.text == "access to payments denied\n"
        assert (await client.post("/version", content=b"x")).status_code == 403
    assert mesh.v1.requests == 1  # nothing denied reached the app
    assert "authorization: web -> payments GET /%61dmin/x denied by rule 'no-admin'" \
        in caplog.text
    assert "authorization: web -> payments POST /version denied by default deny" in caplog.text
    m = mesh.b.metrics
    assert sample(m, "meshd_authz_denied_total", destination="payments", source="web",
                  rule="no-admin") == 1
    assert sample(m, "meshd_authz_denied_total", destination="payments", source="web",
                  rule=DEFAULT_DENY) == 1
    assert sample(m, "meshd_requests_total", direction="inbound", source="web",
                  destination="payments", subset="v1", code="403") == 2


async def test_changed_rule_applies_to_an_open_keep_alive_connection(mesh: Mesh) -> None:
    mesh.set_payments((("v1", 100), ("v2", 0)))
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        assert (await client.get("/version")).status_code == 200
        _protect(mesh, "payments", [{"name": "only-orders", "action": "allow",
                                     "from": ["orders"]}])
        assert (await client.get("/version")).status_code == 403
        mesh.b.proxy.view.set_routes(parse_routes({}))  # rules gone: the default deny, not open
        assert (await client.get("/version")).status_code == 403
        mesh.b.proxy.view.set_routes(parse_routes({"default_policy": "allow"}))
        assert (await client.get("/version")).status_code == 200  # said so explicitly
    assert mesh.a.proxy.pool.opened == 1  # all four on the one mTLS connection


async def test_caller_identity_comes_from_its_certificate(mesh: Mesh, tmp_path: Path) -> None:
    """A client presenting another service's certificate (``orders``) straight to b's inbound
    listener is judged as ``orders``, whatever headers it sends."""
    _protect(mesh, "payments", [{"name": "web", "action": "allow", "from": ["web"]}])
    cert, key = mesh.ca.files(tmp_path / "orders", f"spiffe://{TD}/svc/orders")
    ctx: ssl.SSLContext = client_context(mesh.ca, cert, key)
    raw = await trio.open_tcp_stream("127.0.0.1", mesh.b.port)
    tls = trio.SSLStream(raw, ctx, server_hostname="payments")
    await tls.send_all(b"GET /version HTTP/1.1\r\nHost: payments\r\nx-meshd-source: web\r\n"
                       b"Connection: close\r\n\r\n")
    answer = await read_until_eof(tls)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert sample(mesh.b.metrics, "meshd_authz_denied_total", destination="payments",
                  source="orders", rule=DEFAULT_DENY) == 1


async def test_tcp_connection_denied_at_once_and_cut_when_a_rule_changes(mesh: Mesh) -> None:
    host, port = mesh.a.proxy.outbound_address("web", "ledger")
    _protect(mesh, "ledger", [{"name": "not-web", "action": "deny", "from": ["web"]},
                              {"name": "rest", "action": "allow"}])
    refused = await trio.open_tcp_stream(host, port)
    await refused.send_all(b"hello")
    assert await read_until_eof(refused) == b""
    assert mesh.echo.connections == 0

    _protect(mesh, "ledger", [{"name": "web", "action": "allow", "from": ["web"]}])
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(b"ping")
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b"ping"
    _protect(mesh, "ledger", [{"name": "web-other-paths", "action": "allow", "from": ["web"],
                               "paths": ["/x"]}])  # a path rule never applies to TCP
    assert await read_until_eof(stream) == b""
    m = mesh.b.metrics
    assert sample(m, "meshd_authz_denied_total", destination="ledger", source="web",
                  rule="not-web") == 1
    assert sample(m, "meshd_authz_denied_total", destination="ledger", source="web",
                  rule=DEFAULT_DENY) == 1
