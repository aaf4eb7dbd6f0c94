"""A route's edge features over real loopback sockets and mTLS (the ``farm`` mesh): rate limits
(429, recovery at the configured rate, keyed buckets), header edits on requests and responses,
path prefix and host rewrites seen by the app, redirects; each applied from the table in force
at the request, so a new table applies to the next request."""

from __future__ import annotations

import logging

import httpx
import pytest
import trio
from proxy_mesh_testing import Farm
from proxy_testing import sample

MAX_REQUESTS = 50  # every loop below is bounded in count as well as in time


async def _drain(client: httpx.AsyncClient, path: str = "/version",
                 **headers: str) -> tuple[int, httpx.Response]:
    """Requests until the first 429: how many went through, and that 429."""
    for sent in range(MAX_REQUESTS):
        response = await client.get(path, headers=headers)
        if response.status_code == 429:
            return sent, response
        assert response.status_code == 200
    raise AssertionError(f"no 429 after {MAX_REQUESTS} requests")


def _requests(farm: Farm) -> int:
    return sum(app.requests for app in farm.apps.values())


async def test_429_once_the_bucket_is_empty_then_recovery_at_the_configured_rate(
        farm: Farm, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meshd.access")
    farm.set_routes({"split": {"v1": 100},
                     "rate_limit": {"requests_per_second": 20, "burst": 5}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        passed, refused = await _drain(client)
        # the burst, and at most the token or two that flowed back while they were sent
        assert 5 <= passed <= 7
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["x-meshd-error"] == "rate-limited"
        assert "rate limit of route default reached (20/s, burst 5)" in refused.text
        reached = _requests(farm)
        # for about half a second, as fast as the client goes: 20 tokens a second come back
        start = trio.current_time()
        allowed = refused_count = 0
        for _ in range(400):
            if trio.current_time() - start >= 0.5:
                break
            status = (await client.get("/version")).status_code
            assert status in (200, 429)
            allowed += status == 200
            refused_count += status == 429
            await trio.sleep(0.005)
        elapsed = trio.current_time() - start
        assert 20 * elapsed - 2 <= allowed <= 20 * elapsed + 2, (allowed, elapsed)
        assert _requests(farm) == reached + allowed  # a 429 never reaches an app
    m = farm.a.metrics
    assert sample(m, "meshd_rate_limited_total", destination="payments",
                  route="default") == 1 + refused_count
    lines = [r.getMessage() for r in caplog.records if " 429 " in r.getMessage()]
    assert lines and all("error=rate-limited" in line for line in lines)


async def test_keyed_buckets_are_independent_and_a_new_table_applies_to_the_next_request(
        farm: Farm) -> None:
    farm.set_routes({"split": {"v1": 100}, "routes": [
        {"name": "keyed", "match": {"path": {"prefix": "/k"}},
         "rate_limit": {"requests_per_second": 0.1, "burst": 2, "key": "header:x-api-key"}}]})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        assert (await _drain(client, "/k", **{"x-api-key": "alice"}))[0] == 2
        assert (await _drain(client, "/k", **{"x-api-key": "bob"}))[0] == 2  # its own bucket
        # without the header: one bucket for all such requests, not a way around the limit
        assert (await _drain(client, "/k"))[0] == 2
        assert (await client.get("/k", headers={"x-api-key": "alice"})).status_code == 429
        assert (await client.get("/other")).status_code == 200  # the default route: no limit
        farm.set_routes({"split": {"v1": 100}})  # the limit removed: no restart, next request
        assert (await client.get("/k", headers={"x-api-key": "alice"})).status_code == 200


async def test_request_and_response_headers_add_set_remove(farm: Farm) -> None:
    for app in farm.apps.values():
        app.extra_headers = [("x-app", "1"), ("x-internal", "secret"), ("x-multi", "a")]
    farm.set_routes({"split": {"v1": 100},
                     "request_headers": {"add": {"x-via": "mesh", "x-multi": "b"},
                                         "set": {"x-env": "prod"}, "remove": ["x-debug"]},
                     "response_headers": {"add": {"x-multi": "b"}, "set": {"x-app": "2"},
                                          "remove": ["x-internal"]}})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        response = await client.get("/version", headers=[
            ("x-env", "dev"), ("x-env", "test"), ("x-debug", "1"), ("x-multi", "a")])
        assert response.status_code == 200
        seen = response.json()["headers"]  # what the app got
        assert seen["x-via"] == "mesh"
        assert seen["x-env"] == "prod"  # set: both values replaced by one
        assert "x-debug" not in seen
        assert response.headers.get_list("x-multi") == ["a", "b"]  # add keeps what was there
        assert response.headers["x-app"] == "2"
        assert "x-internal" not in response.headers


async def test_prefix_and_host_rewrite_seen_by_the_app(farm: Farm) -> None:
    farm.set_routes({"split": {"v1": 100}, "routes": [
        {"name": "api", "match": {"path": {"prefix": "/api/"}},
         "rewrite": {"prefix": "/", "host": "api.internal"}},
        {"name": "legacy", "match": {"path": {"prefix": "/legacy"}},
         "rewrite": {"prefix": "/v2"}}]})
    async with httpx.AsyncClient(base_url=farm.url()) as client:
        body = (await client.get("/api/version?x=1")).json()
        assert body["path"] == "/version"
        assert body["headers"]["host"] == "api.internal"
        body = (await client.get("/legacy/version")).json()
        assert body["path"] == "/v2/version"
        assert body["headers"]["host"] == farm.url().removeprefix("http://")  # as sent
        body = (await client.get("/other")).json()  # no rewrite on the default route
        assert body["path"] == "/other"


async def test_redirects_are_answered_by_meshd_with_location(farm: Farm) -> None:
    farm.set_routes({"split": {"v1": 100}, "routes": [
        {"name": "secure", "match": {"path": {"prefix": "/login"}},
         "redirect": {"scheme": "https"}},
        {"name": "moved", "match": {"path": {"prefix": "/old/"}},
         "redirect": {"status": 308, "host": "new.example", "port": 8443, "prefix": "/new/"},
         "response_headers": {"set": {"cache-control": "no-store"}}},
        {"name": "see-other", "match": {"path": {"exact": "/form"}},
         "redirect": {"status": 303, "path": "/done"}}]})
    async with httpx.AsyncClient(base_url=farm.url(), follow_redirects=False) as client:
        response = await client.get("/login?next=/a", headers={"host": "shop.example:8080"})
        assert response.status_code == 301
        assert response.headers["location"] == "https://shop.example/login?next=/a"
        response = await client.get("/old/pay/1?x=2", headers={"host": "shop.example"})
        assert response.status_code == 308
        assert response.headers["location"] == "http://new.example:8443/new/pay/1?x=2"
        assert response.headers["cache-control"] == "no-store"
        response = await client.post("/form", content=b"a=1", headers={"host": "shop"})
        assert response.status_code == 303
        assert response.headers["location"] == "http://shop/done"
        assert (await client.get("/version")).status_code == 200  # the connection goes on
    assert _requests(farm) == 1  # no redirect reached an app
