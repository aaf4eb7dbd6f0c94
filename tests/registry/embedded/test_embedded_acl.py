"""ACLs with ``--acl-master-token``: Consul's 403 bodies, silent list filtering, three ways to
send a token; meshd's own adapter sends the token it is given."""

from __future__ import annotations

import httpx
import pytest
import trio
from registry_testing import start_registry

from meshd.errors import RegistryError
from meshd.registry.consul import ConsulClient

pytestmark = pytest.mark.embedded_only("starts the embedded registry with a master token")

MASTER = "s3cret-master"
ANONYMOUS_DENIAL = ("Permission denied: anonymous token lacks permission 'service:write' on "
                    '"web". The anonymous token is used implicitly when a request does not '
                    "specify a token.")


async def test_requests_without_the_master_token_are_denied(nursery: trio.Nursery) -> None:
    reg = await start_registry(nursery, acl_master_token=MASTER)
    async with reg.client as anon, httpx.AsyncClient(
            base_url=reg.url, headers={"X-Consul-Token": MASTER}) as admin:
        r = await anon.put("/v1/agent/service/register", json={"Name": "web"})
        assert (r.status_code, r.text) == (403, ANONYMOUS_DENIAL)
        assert r.headers["X-Consul-Default-ACL-Policy"] == "deny"
        r = await admin.put("/v1/agent/service/register", json={"Name": "web",
                                                                 "Check": {"TTL": "30s"}})
        assert r.status_code == 200, r.text
        await admin.put("/v1/kv/secret", content=b"42")

        # lists filter silently: 200 with nothing readable
        assert (await anon.get("/v1/agent/services")).json() == {}
        assert (await anon.get("/v1/agent/checks")).json() == {}
        assert (await anon.get("/v1/catalog/services")).json() == {}
        assert (await anon.get("/v1/health/service/web")).json() == []
        assert (await anon.get("/v1/catalog/node/meshd-registry")).json() is None
        assert (await anon.get("/v1/kv/?recurse")).status_code == 404
        assert (await anon.get("/v1/session/list")).json() == []
        # single objects and writes: 403
        r = await anon.get("/v1/kv/secret")
        assert r.status_code == 403 and r.text.startswith(
            "Permission denied: anonymous token lacks permission 'key:read' on \"secret\"")
        assert (await anon.put("/v1/kv/secret", content=b"0")).status_code == 403
        assert (await anon.delete("/v1/kv/secret")).status_code == 403
        assert (await anon.put("/v1/session/create")).status_code == 403
        assert (await anon.get("/v1/agent/self")).status_code == 403
        assert (await anon.put("/v1/agent/check/pass/service:web")).status_code == 403
        r = await anon.put("/v1/txn", json=[{"KV": {"Verb": "get", "Key": "secret"}}])
        assert r.status_code == 409 and r.json()["Errors"][0]["What"] == "Permission denied"
        # no token needed
        assert (await anon.get("/v1/status/leader")).status_code == 200
        assert (await anon.get("/v1/catalog/datacenters")).json() == ["dc1"]

        # an unknown token is not the anonymous token
        r = await anon.get("/v1/kv/secret", headers={"X-Consul-Token": "guess"})
        assert (r.status_code, r.text) == (403, "ACL not found")
        r = await anon.get("/v1/catalog/services", params={"token": "guess"})
        assert (r.status_code, r.text) == (403, "ACL not found")

        # the master token, three ways
        for how in ({"params": {"token": MASTER}},
                    {"headers": {"X-Consul-Token": MASTER}},
                    {"headers": {"Authorization": f"bearer {MASTER}"}}):
            r = await anon.get("/v1/kv/secret", **how)  # type: ignore[arg-type]
            assert r.status_code == 200 and r.json()[0]["Value"] == "NDI="
        assert list((await admin.get("/v1/agent/services")).json()) == ["web"]
        me = (await admin.get("/v1/acl/token/self")).json()
        assert me["SecretID"] == MASTER and me["Policies"][0]["Name"] == "global-management"
        r = await admin.get("/v1/acl/policies")
        assert [p["Name"] for p in r.json()] == ["global-management"]
        assert (await anon.get("/v1/acl/policies")).status_code == 403
        nursery.cancel_scope.cancel()


async def test_consul_client_sends_its_token(nursery: trio.Nursery) -> None:
    reg = await start_registry(nursery, acl_master_token=MASTER)
    async with ConsulClient(reg.url, token=MASTER) as admin, ConsulClient(reg.url) as anon:
        assert await admin.kv_put("meshd/config/routes", b"{}", cas=0)
        assert (await admin.kv_get("meshd/config/routes")).data is not None
        with pytest.raises(RegistryError, match="403"):
            await anon.kv_get("meshd/config/routes")
    await reg.client.aclose()
    nursery.cancel_scope.cancel()


async def test_acl_endpoints_when_acls_are_off(client: httpx.AsyncClient) -> None:
    for method, path in (("GET", "/v1/acl/token/self"), ("PUT", "/v1/acl/bootstrap"),
                         ("PUT", "/v1/agent/token/default")):
        r = await client.request(method, path)
        assert (r.status_code, r.text) == (401, "ACL support disabled")
    r = await client.put("/v1/agent/service/register", json={"Name": "x"},
                         headers={"X-Consul-Token": "ignored"})
    assert r.status_code == 200
