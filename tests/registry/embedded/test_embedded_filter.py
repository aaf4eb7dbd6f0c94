"""``?filter=``: the bexpr subset as a table over objects, then on the endpoints over HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from meshd.registry.embedded.filter import compile_filter
from meshd.registry.embedded.filter_schemas import AGENT_SERVICE, HEALTH_ENTRY
from meshd.registry.embedded.store.records import ApiError

WEB = {"ID": "web-1", "Service": "web", "Tags": ["v1", "blue"], "Meta": {"version": "v1"},
       "Port": 8080, "Address": "10.0.0.5", "EnableTagOverride": False,
       "Weights": {"Passing": 1, "Warning": 1}}
API = {"ID": "api-1", "Service": "api", "Tags": [], "Meta": {}, "Port": 0, "Address": "",
       "Kind": "connect-proxy", "Proxy": {"DestinationServiceName": "web"}}


@pytest.mark.parametrize(("expression", "web", "api"), [
    ('Service == "web"', True, False),
    ("Service == web", True, False),  # a bare word value, as bexpr allows
    ('Service != "web"', False, True),
    ('"v1" in Tags', True, False),
    ('"v1" not in Tags', False, True),
    ('Tags contains "blue"', True, False),
    ('Tags not contains "blue"', False, True),
    ("Tags is empty", False, True),
    ("Tags is not empty", True, False),
    ("Meta.version == v1", True, False),
    ('Meta.version == ""', False, True),  # a missing key reads as ""
    ('"version" in Meta', True, False),
    ("Meta is empty", False, True),
    ("Port == 8080", True, False),
    ('Port == "8080"', True, False),
    ("EnableTagOverride == false", True, True),
    ('Service matches "^w.b$"', True, False),
    ('Service not matches "^w"', False, True),
    ('Address contains "10.0"', True, False),
    ("Kind == `connect-proxy`", False, True),
    ('Proxy.DestinationServiceName == "web"', False, True),
    ('Service == "web" and Port == 8080', True, False),
    ('Service == "api" or Port == 8080', True, True),
    ('not Service == "web"', False, True),
    ('not (Service == "web" or Service == "api")', False, False),
    ('(Service == "web" or Service == "api") and "v1" in Tags', True, False),
    ("Weights.Passing == 1", True, False),
])
def test_expressions(expression: str, web: bool, api: bool) -> None:
    predicate = compile_filter(expression, AGENT_SERVICE)
    assert (predicate(WEB), predicate(API)) == (web, api)


def test_selectors_through_lists_match_any_element() -> None:
    entry = {"Node": {"Node": "n1", "Meta": {"rack": "a"}}, "Service": {"Service": "web"},
             "Checks": [{"CheckID": "serfHealth", "Status": "passing"},
                        {"CheckID": "service:web", "Status": "critical"}]}
    assert compile_filter("Checks.Status == critical", HEALTH_ENTRY)(entry)
    assert compile_filter("Checks.Status != passing", HEALTH_ENTRY)(entry)
    assert not compile_filter("Checks.Status == warning", HEALTH_ENTRY)(entry)
    assert compile_filter("Checks.0.CheckID == serfHealth", HEALTH_ENTRY)(entry)
    assert compile_filter('Node.Meta["rack"] == "a"', HEALTH_ENTRY)(entry)


@pytest.mark.parametrize("expression", [
    "", "Service ==", '== "web"', 'Colour == "red"', 'Service === "web"',
    '(Service == "web"', 'Service == "web")', 'Service == "web" and', '"web" == Service',
    "Tags == v1", "Port == eighty", 'Service matches "("', "Port contains 8",
    'Service matches "(a)\\\\1"', 'Service matches "(?=w)"',
    'Service == "unterminated', "Service = web", "Service is full",
])
def test_what_is_not_understood_is_refused(expression: str) -> None:
    with pytest.raises(ApiError) as info:
        compile_filter(expression, AGENT_SERVICE)
    assert info.value.status == 400


async def _register(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    r = await client.put("/v1/agent/service/register", json=body)
    assert r.status_code == 200, r.text


async def test_filter_on_the_endpoints(client: httpx.AsyncClient) -> None:
    await _register(client, {"Name": "web", "ID": "web-1", "Tags": ["v1"],
                             "Meta": {"version": "v1"}, "Check": {"TTL": "30s"}})
    await _register(client, {"Name": "web", "ID": "web-2", "Tags": ["v2"],
                             "Meta": {"version": "v2"}, "Check": {"TTL": "30s",
                                                                  "Status": "passing"}})
    await _register(client, {"Name": "db", "Port": 5432})

    async def get(path: str, expression: str) -> Any:
        r = await client.get(path, params={"filter": expression})
        assert r.status_code == 200, r.text
        return r.json()

    assert list(await get("/v1/agent/services", 'Meta.version == "v2"')) == ["web-2"]
    assert list(await get("/v1/agent/services", 'Service == "db" or "v1" in Tags')) == [
        "db", "web-1"]
    assert list(await get("/v1/agent/checks", "Status == passing")) == ["service:web-2"]
    assert [e["ServiceID"] for e in await get("/v1/catalog/service/web",
                                              'ServiceMeta.version == "v1"')] == ["web-1"]
    assert await get("/v1/catalog/services", "ServicePort == 5432") == {"db": []}
    entries = await get("/v1/health/service/web", "Checks.Status == critical")
    assert [e["Service"]["ID"] for e in entries] == ["web-1"]
    entries = await get("/v1/health/service/web", '"v2" in Service.Tags')
    assert [e["Service"]["ID"] for e in entries] == ["web-2"]
    checks = await get("/v1/health/state/any", 'ServiceName == "web"')
    assert sorted(c["CheckID"] for c in checks) == ["service:web-1", "service:web-2"]
    assert len(await get("/v1/catalog/nodes", 'Meta["consul-network-segment"] == ""')) == 1

    for path in ("/v1/agent/services", "/v1/catalog/service/web", "/v1/health/service/web",
                 "/v1/health/checks/web", "/v1/catalog/nodes"):
        r = await client.get(path, params={"filter": "Nonsense == 1"})
        assert r.status_code in (400, 500), (path, r.status_code)


async def test_a_backtracking_filter_does_not_stall_the_registry(client: httpx.AsyncClient,
                                                                 ) -> None:
    """``matches "^(a+)+$"`` over a 60-character value would take Python's ``re`` about 2**60
    steps; with RE2 the filter answers at once and a side client is served meanwhile."""
    await _register(client, {"Name": "web", "ID": "web-1", "Meta": {"x": "a" * 60 + "!"}})
    await _register(client, {"Name": "db", "ID": "db-1", "Meta": {"x": "a" * 60}})
    side_answers: list[int] = []

    async def side_client() -> None:
        for _ in range(20):
            side_answers.append((await client.get("/v1/agent/services")).status_code)

    with trio.fail_after(20):  # a hang guard, not a speed test: re would never finish
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side_client)
            for _ in range(5):
                r = await client.get("/v1/agent/services",
                                     params={"filter": 'Meta.x matches "^(a+)+$"'})
                assert r.status_code == 200, r.text
                assert list(r.json()) == ["db-1"]
    assert side_answers == [200] * 20


async def test_a_pattern_re2_refuses_is_a_400_naming_it(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/agent/services", params={"filter": 'Service matches "(a)\\\\1"'})
    assert r.status_code == 400
    assert "Failed to compile regular expression" in r.text and "invalid escape" in r.text
