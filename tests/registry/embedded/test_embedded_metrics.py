"""The embedded registry's own metrics, over real HTTP: Consul's ``/v1/agent/metrics`` (JSON, or
Prometheus text) and ``/metrics``, counted requests, writes, blocking queries, catalog sizes, the
durable log; with ACLs on, Consul's rule for the endpoint (agent:read)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from registry_testing import start_registry

pytestmark = pytest.mark.embedded_only("reads the embedded registry's own series")

MASTER = "s3cret-master"


def values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float | None:
    return values(text).get((name, frozenset(labels.items())))


async def test_metrics_count_requests_writes_blocking_queries_and_catalog(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    reg = await start_registry(nursery, data_dir=tmp_path / "data")
    async with reg.client as client:
        r = await client.put("/v1/agent/service/register", json={
            "Name": "web", "ID": "web-1", "Port": 8080, "Check": {"TTL": "30s"}})
        assert r.status_code == 200, r.text
        for i in range(3):
            assert (await client.put(f"/v1/kv/app/{i}", content=b"x")).status_code == 200
        assert (await client.get("/v1/kv/nowhere")).status_code == 404
        assert (await client.get("/no/such/path/1")).status_code == 404
        assert (await client.request("PROPFIND", "/v1/kv/app/0")).status_code == 405
        index = int((await client.get("/v1/kv/app/0")).headers["X-Consul-Index"])

        seen: list[float | None] = []
        async with trio.open_nursery() as waiting:
            waiting.start_soon(partial(client.get, "/v1/kv/app/0",
                                       params={"index": str(index), "wait": "5s"}))
            with trio.fail_after(5):
                while not seen or seen[-1] != 1:
                    await trio.sleep(0.02)
                    seen.append(value((await client.get("/metrics")).text,
                                      "meshd_registry_blocking_queries"))
            await client.put("/v1/kv/app/0", content=b"y")  # wakes the waiter
        last_write = int((await client.get("/v1/kv/app/0")).headers["X-Consul-Index"])
        text = (await client.get("/metrics")).text

    assert value(text, "meshd_registry_blocking_queries") == 0
    assert value(text, "meshd_registry_http_requests_total", method="PUT", route="/v1/kv/",
                 code="200") == 4
    assert value(text, "meshd_registry_http_requests_total", method="GET", route="/v1/kv/",
                 code="404") == 1  # by route: never the raw path
    # client-chosen values never become label values
    assert value(text, "meshd_registry_http_requests_total", method="GET", route="unmatched",
                 code="404") == 1
    assert value(text, "meshd_registry_http_requests_total", method="other", route="/v1/kv/",
                 code="405") == 1
    assert value(text, "meshd_registry_writes_total", table="kv") == 4
    assert value(text, "meshd_registry_catalog_services") == 2  # consul and web
    assert value(text, "meshd_registry_catalog_checks", status="critical") == 1  # TTL, new
    assert value(text, "meshd_registry_catalog_checks", status="passing") == 1  # serfHealth
    assert value(text, "meshd_registry_kv_keys") == 3
    assert value(text, "meshd_registry_index") == last_write > index
    appended = value(text, "meshd_registry_log_append_duration_seconds_count")
    assert appended is not None and appended >= 5  # every write went to the durable log
    assert value(text, "process_resident_memory_bytes")
    assert "_created" not in text


async def test_consul_metrics_endpoint_formats(nursery: trio.Nursery) -> None:
    reg = await start_registry(nursery)
    async with reg.client as client:
        r = await client.get("/v1/agent/metrics", params={"format": "prometheus"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert value(r.text, "meshd_registry_catalog_nodes") == 1
        r = await client.get("/v1/agent/metrics")
        assert r.status_code == 200
        gauges = {g["Name"]: g["Value"] for g in r.json()["Gauges"]}
        assert gauges["meshd_registry_catalog_nodes"] == 1
        assert any(c["Name"] == "meshd_registry_http_requests_total"
                   for c in r.json()["Counters"])
        assert (await client.get("/v1/agent/metrics", params={"format": "xml"})).status_code \
            == 400
        assert (await client.put("/metrics")).status_code == 405


async def test_metrics_need_agent_read_when_acls_are_on(nursery: trio.Nursery) -> None:
    reg = await start_registry(nursery, acl_master_token=MASTER)
    admin = httpx.AsyncClient(base_url=reg.url, headers={"X-Consul-Token": MASTER})
    async with reg.client as anon, admin:
        tokens = {}
        for name, rules in (("scraper", 'agent_prefix "" { policy = "read" }'),
                            ("kv-only", 'key_prefix "" { policy = "read" }')):
            r = await admin.put("/v1/acl/policy", json={"Name": name, "Rules": rules})
            assert r.status_code == 200, r.text
            r = await admin.put("/v1/acl/token", json={"Policies": [{"Name": name}]})
            tokens[name] = r.json()["SecretID"]
        for path in ("/metrics", "/v1/agent/metrics?format=prometheus"):
            r = await anon.get(path)
            assert r.status_code == 403 and "lacks permission 'agent:read'" in r.text
            assert "meshd_registry" not in r.text
            r = await anon.get(path, headers={"Authorization": "Bearer guess"})
            assert (r.status_code, r.text) == (403, "ACL not found")
            r = await anon.get(path, headers={"Authorization": f"Bearer {tokens['kv-only']}"})
            assert r.status_code == 403
            for headers in ({"Authorization": f"Bearer {tokens['scraper']}"},
                            {"X-Consul-Token": tokens["scraper"]},
                            {"Authorization": f"Bearer {MASTER}"}):
                r = await anon.get(path, headers=headers)
                assert r.status_code == 200 and "meshd_registry_index" in r.text
