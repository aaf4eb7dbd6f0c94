"""``meshd explain`` shows a route's edge features for the request it explains: rate limit,
header edits, rewrites (the path and host the app gets) and redirects (the location the
client gets, as a live proxy answers it)."""

from __future__ import annotations

from typing import Any

import httpx
from proxy_mesh_testing import Farm

from meshd.config.routes import parse_routes, routes_to_data
from meshd.explain.route import explain, render
from meshd.proxy.core.matcher import RequestFacts

EDGE: dict[str, Any] = {
    "subsets": {"v1": {"version": "v1"}},
    "split": {"v1": 100},
    "rate_limit": {"requests_per_second": 50, "burst": 100, "key": "source"},
    "routes": [
        {"name": "api", "match": {"path": {"prefix": "/api/"}},
         "rate_limit": {"requests_per_second": 5, "key": "header:x-api-key"},
         "request_headers": {"add": {"x-via": "mesh"}, "remove": ["x-debug"]},
         "response_headers": {"set": {"cache-control": "no-store"}},
         "rewrite": {"prefix": "/v2/", "host": "api.internal"}},
        {"name": "old", "match": {"path": {"prefix": "/old/"}},
         "redirect": {"status": 308, "scheme": "https", "prefix": "/new/"}},
    ],
}


def _state(entry: dict[str, Any]) -> dict[str, Any]:
    table = parse_routes({"destinations": {"payments": entry}})
    endpoint = {"node": "b", "instance_id": "payments-v1", "address": "10.0.0.1",
                "port": 15001, "version": "v1", "healthy": True}
    return {"ready": True, "generation": 3, "routes": routes_to_data(table),
            "destinations": {"payments": {"index": 1, "endpoints": [endpoint]}}}


def test_rate_limit_header_edits_and_rewrite_of_the_route_explained() -> None:
    found = explain(_state(EDGE), "payments",
                    RequestFacts("GET", "/api/users?id=1", [("Host", "shop")]))
    text = render(found)
    assert ("  rate limit: 5 requests/s, burst 5, a bucket per value of header x-api-key, on "
            "each calling meshd; over it: 429 with retry-after") in text
    assert "  request headers: add x-via: mesh, remove x-debug" in text
    assert ("  rewrite: path /api/users -> /v2/users (prefix /api/ -> /v2/), "
            "host shop -> api.internal") in text
    assert "  response headers: set cache-control: no-store" in text
    assert found.reaches_app
    default = render(explain(_state(EDGE), "payments", RequestFacts("GET", "/pay")))
    assert "  rate limit: 50 requests/s, burst 100, a bucket per calling service" in default


def test_a_redirect_is_explained_with_its_location_and_reaches_no_app() -> None:
    found = explain(_state(EDGE), "payments",
                    RequestFacts("GET", "/old/a?x=1", [("Host", "shop:8080")]))
    assert "  redirect: meshd answers 308 with location https://shop/new/a?x=1; nothing is " \
        "forwarded" in render(found)
    assert not found.routable and not found.reaches_app


async def test_explained_redirect_agrees_with_a_live_proxy(farm: Farm) -> None:
    farm.set_routes(EDGE)
    state = {"routes": routes_to_data(farm.view.current.routes), "destinations": {}}
    found = explain(state, "payments", RequestFacts("GET", "/old/pay?x=1",
                                                    [("Host", "shop.example")]))
    async with httpx.AsyncClient(base_url=farm.url(), follow_redirects=False) as client:
        response = await client.get("/old/pay?x=1", headers={"host": "shop.example"})
    assert response.status_code == 308
    assert f"with location {response.headers['location']};" in render(found)
