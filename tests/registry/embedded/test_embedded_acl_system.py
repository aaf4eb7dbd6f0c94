"""Consul's ACL system over real HTTP: bootstrap, policies, tokens, enforcement on the endpoints
the mesh uses, list filtering, persistence across a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from registry_testing import Registry, start_registry

from meshd.errors import RegistryError
from meshd.registry.consul import ConsulClient
from meshd.registry.embedded.server import RegistryConfig, serve_registry

pytestmark = pytest.mark.embedded_only("starts the embedded registry with ACL flags")

HOST_A_RULES = """
key_prefix "meshd/config/" { policy = "read" }
service "web" { policy = "write" }
node "host-a" { policy = "write" }
"""


def _client(reg: Registry, token: str = "") -> httpx.AsyncClient:
    headers = {"X-Consul-Token": token} if token else {}
    return httpx.AsyncClient(base_url=reg.url, headers=headers, timeout=30, trust_env=False)


async def _deny_registry(nursery: trio.Nursery, **config: Any) -> Registry:
    return await start_registry(nursery, acl_enabled=True, acl_default_policy="deny", **config)


async def _bootstrap(client: httpx.AsyncClient) -> str:
    r = await client.put("/v1/acl/bootstrap")
    assert r.status_code == 200, r.text
    return str(r.json()["SecretID"])


async def _token_for(admin: httpx.AsyncClient, name: str, rules: str) -> dict[str, Any]:
    r = await admin.put("/v1/acl/policy", json={"Name": name, "Rules": rules})
    assert r.status_code == 200, r.text
    r = await admin.put("/v1/acl/token", json={"Description": name,
                                               "Policies": [{"Name": name}]})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def admin_index(reg: Registry) -> int:
    async with _client(reg, "anonymous") as anon:
        return int((await anon.get("/v1/acl/token/self")).headers["X-Consul-Index"])


async def test_bootstrap_once(nursery: trio.Nursery) -> None:
    reg = await _deny_registry(nursery)
    async with reg.client as anon:
        r = await anon.put("/v1/acl/bootstrap")
        assert r.status_code == 200
        token = r.json()
        assert token["ID"] == token["SecretID"]
        assert token["Policies"] == [{"ID": "00000000-0000-0000-0000-000000000001",
                                      "Name": "global-management"}]
        assert token["Description"] == "Bootstrap Token (Global Management)"
        assert token["CreateIndex"] == token["ModifyIndex"] >= 1
        r = await anon.put("/v1/acl/bootstrap")
        assert (r.status_code, r.text) == (403, "Permission denied: ACL bootstrap no longer "
                                                f"allowed (reset index: {token['CreateIndex']})")
        me = (await anon.get("/v1/acl/token/self",
                             headers={"X-Consul-Token": token["SecretID"]})).json()
        assert me["AccessorID"] == token["AccessorID"]
        anonymous = (await anon.get("/v1/acl/token/self")).json()
        assert anonymous["AccessorID"] == "00000000-0000-0000-0000-000000000002"
        assert anonymous["Description"] == "Anonymous Token"
    nursery.cancel_scope.cancel()


async def test_initial_management_uses_up_the_bootstrap(nursery: trio.Nursery) -> None:
    reg = await _deny_registry(nursery, acl_initial_management="root-secret")
    async with reg.client as anon:
        assert (await anon.put("/v1/acl/bootstrap")).status_code == 403
        r = await anon.get("/v1/acl/token/self", headers={"X-Consul-Token": "root-secret"})
        assert r.json()["Policies"][0]["Name"] == "global-management"
    nursery.cancel_scope.cancel()


async def test_a_meshd_host_token_does_only_its_own_work(nursery: trio.Nursery) -> None:
    reg = await _deny_registry(nursery)
    async with reg.client as anon:
        async with _client(reg, await _bootstrap(anon)) as admin:
            assert (await admin.put("/v1/kv/meshd/config/routes", content=b"{}")).json()
            host = await _token_for(admin, "meshd-host-a", HOST_A_RULES)
        assert host["Policies"][0]["Name"] == "meshd-host-a"
        async with _client(reg, host["SecretID"]) as a:
            # its own service (and its sidecar's destination is itself)
            r = await a.put("/v1/agent/service/register",
                            json={"Name": "web", "ID": "web-1", "Port": 80,
                                  "Check": {"TTL": "30s"}})
            assert r.status_code == 200, r.text
            assert (await a.put("/v1/agent/check/pass/service:web-1")).status_code == 200
            # its node in the catalog, with web on it
            r = await a.put("/v1/catalog/register", json={
                "Node": "host-a", "Address": "10.0.0.1",
                "Service": {"Service": "web", "ID": "web-a", "Port": 80}})
            assert r.status_code == 200, r.text
            # reads the mesh config, cannot write it
            r = await a.get("/v1/kv/meshd/config/routes")
            assert r.status_code == 200
            r = await a.put("/v1/kv/meshd/config/routes", content=b'{"open": true}')
            assert (r.status_code, r.text) == (
                403, f"Permission denied: token with AccessorID '{host['AccessorID']}' lacks "
                     "permission 'key:write' on \"meshd/config/routes\"")
            assert (await a.delete("/v1/kv/meshd/config/?recurse")).status_code == 403
            r = await a.put("/v1/txn", json=[{"KV": {"Verb": "set", "Key": "meshd/config/routes",
                                                     "Value": "e30="}}])
            assert r.status_code == 409
            assert r.json()["Errors"] == [{"OpIndex": 0, "What": "Permission denied"}]
            # cannot register another service, or another node's service
            r = await a.put("/v1/agent/service/register", json={"Name": "payments"})
            assert r.status_code == 403 and "'service:write' on \"payments\"" in r.text
            r = await a.put("/v1/agent/service/register", json={
                "Name": "web-sidecar-proxy", "Kind": "connect-proxy",
                "Proxy": {"DestinationServiceName": "payments"}})
            assert r.status_code == 403
            r = await a.put("/v1/catalog/register", json={
                "Node": "host-b", "Address": "10.0.0.2",
                "Service": {"Service": "web", "Port": 80}})
            assert r.status_code == 403 and "'node:write' on \"host-b\"" in r.text
            # nor hijack the registry's own node or its checks
            assert (await a.put("/v1/agent/maintenance?enable=true")).status_code == 403
            r = await a.put("/v1/catalog/deregister", json={"Node": "host-a",
                                                            "ServiceID": "web-a"})
            assert r.status_code == 200
    nursery.cancel_scope.cancel()


async def test_anonymous_writes_refused_and_lists_filtered(nursery: trio.Nursery) -> None:
    reg = await _deny_registry(nursery)
    async with reg.client as anon:
        async with _client(reg, await _bootstrap(anon)) as admin:
            for name in ("web", "payments"):
                await admin.put("/v1/agent/service/register", json={"Name": name})
            await admin.put("/v1/kv/meshd/config/routes", content=b"{}")
            await admin.put("/v1/kv/meshd/secret", content=b"x")
            reader = await _token_for(admin, "web-reader", """
                service "web" { policy = "read" }
                node_prefix "" { policy = "read" }
                key_prefix "meshd/config/" { policy = "read" }""")
        async with _client(reg, reader["SecretID"]) as r_client:
            r = await anon.put("/v1/kv/meshd/config/routes", content=b"{}")
            assert r.status_code == 403 and r.text.startswith(
                "Permission denied: anonymous token lacks permission 'key:write'")
            assert (await anon.put("/v1/agent/service/register",
                                   json={"Name": "evil"})).status_code == 403
            r = await anon.get("/v1/catalog/services")
            assert r.json() == {} and "X-Consul-Results-Filtered-By-ACLs" not in r.headers

            r = await r_client.get("/v1/catalog/services")
            assert r.status_code == 200 and list(r.json()) == ["web"]
            assert r.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
            r = await r_client.get("/v1/agent/services")
            assert list(r.json()) == ["web"]
            assert [e["Service"]["Service"] for e in
                    (await r_client.get("/v1/health/service/web")).json()] == ["web"]
            assert (await r_client.get("/v1/health/service/payments")).json() == []
            r = await r_client.get("/v1/kv/meshd/?recurse")
            assert [e["Key"] for e in r.json()] == ["meshd/config/routes"]
            assert r.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
            r = await r_client.get("/v1/kv/meshd/?keys")
            assert r.json() == ["meshd/config/routes"]
            r = await r_client.put("/v1/txn", json=[{"KV": {"Verb": "get-tree",
                                                            "Key": "meshd/"}}])
            assert [x["KV"]["Key"] for x in r.json()["Results"]] == ["meshd/config/routes"]
            # the ACL endpoints need acl:read
            r = await r_client.get("/v1/acl/tokens")
            assert r.status_code == 403 and "'acl:read'" in r.text
    nursery.cancel_scope.cancel()


async def test_policy_and_token_endpoints(nursery: trio.Nursery) -> None:
    reg = await _deny_registry(nursery)
    async with reg.client as anon, _client(reg, await _bootstrap(anon)) as admin:
        r = await admin.put("/v1/acl/policy", json={"Name": "bad", "Rules": 'key "x" {'})
        assert r.status_code == 500 and r.text.startswith("Failed to parse ACL rules: ")
        r = await admin.put("/v1/acl/policy", json={
            "Name": "bad", "Rules": 'service "x" { policy = "admin" }'})
        assert r.status_code == 500 and r.text.startswith("Invalid service policy: ")
        r = await admin.put("/v1/acl/policy", json={"Name": "p", "ID": "x"})
        assert (r.status_code, r.text) == (400, "Cannot specify the ID when creating a new "
                                                "policy")
        policy = (await admin.put("/v1/acl/policy", json={
            "Name": "readers", "Description": "d", "Rules": 'key_prefix "" '
                                                            '{ policy = "read" }'})).json()
        r = await admin.put("/v1/acl/policy", json={"Name": "readers"})
        assert (r.status_code, r.text) == (500, 'Invalid Policy: A Policy with Name '
                                                '"readers" already exists')
        assert (await admin.get(f"/v1/acl/policy/{policy['ID']}")).json() == policy
        assert (await admin.get("/v1/acl/policy/name/readers")).json()["ID"] == policy["ID"]
        r = await admin.get("/v1/acl/policy/name/nope")
        assert (r.status_code, r.text) == (404, "Requested policy does not exist: ACL not "
                                                "found")
        listed = (await admin.get("/v1/acl/policies")).json()
        assert [p["Name"] for p in listed] == ["global-management", "readers"]
        assert "Rules" not in listed[1]
        updated = (await admin.put(f"/v1/acl/policy/{policy['ID']}", json={
            "Name": "readers", "Rules": 'key_prefix "a/" { policy = "read" }'})).json()
        assert updated["ModifyIndex"] > policy["ModifyIndex"]
        assert updated["CreateIndex"] == policy["CreateIndex"]

        token = (await admin.put("/v1/acl/token", json={
            "Description": "t", "Policies": [{"ID": policy["ID"]}]})).json()
        assert token["Policies"] == [{"ID": policy["ID"], "Name": "readers"}]
        r = await admin.put("/v1/acl/token", json={"Policies": [{"Name": "nope"}]})
        assert (r.status_code, r.text) == (500, 'No such ACL policy with name "nope"')
        got = (await admin.get(f"/v1/acl/token/{token['AccessorID']}")).json()
        assert got == token
        listed = (await admin.get("/v1/acl/tokens")).json()
        assert token["AccessorID"] in {t["AccessorID"] for t in listed}
        r = await admin.put(f"/v1/acl/token/{token['AccessorID']}",
                            json={"Description": "renamed",
                                  "Policies": [{"Name": "readers"}]})
        assert r.json()["Description"] == "renamed"
        assert r.json()["SecretID"] == token["SecretID"]
        # a reader of ACLs sees secrets redacted, as Consul shows them
        acl_reader = await _token_for(admin, "acl-reader", 'acl = "read"')
        async with _client(reg, acl_reader["SecretID"]) as ro:
            secrets = {t["SecretID"] for t in (await ro.get("/v1/acl/tokens")).json()}
            assert secrets == {"<hidden>"}
            r = await ro.put("/v1/acl/token", json={})
            assert r.status_code == 403 and "'acl:write'" in r.text
        assert (await admin.delete(f"/v1/acl/token/{token['AccessorID']}")).json() is True
        r = await admin.get(f"/v1/acl/token/{token['AccessorID']}")
        assert (r.status_code, r.text) == (404, "Requested token does not exist: ACL not "
                                                "found")
        r = await anon.get("/v1/kv/x", headers={"X-Consul-Token": token["SecretID"]})
        assert (r.status_code, r.text) == (403, "ACL not found")
        r = await admin.delete("/v1/acl/token/00000000-0000-0000-0000-000000000002")
        assert (r.status_code, r.text) == (500, "Delete operation not permitted on the "
                                                "anonymous token")
        r = await admin.delete("/v1/acl/policy/00000000-0000-0000-0000-000000000001")
        assert r.status_code == 500
        assert (await admin.delete(f"/v1/acl/policy/{policy['ID']}")).json() is True
    nursery.cancel_scope.cancel()


async def test_default_allow_still_guards_acls(nursery: trio.Nursery) -> None:
    reg = await start_registry(nursery, acl_enabled=True)
    async with reg.client as anon:
        r = await anon.put("/v1/kv/x", content=b"1")
        assert r.status_code == 200 and r.headers["X-Consul-Default-ACL-Policy"] == "allow"
        assert (await anon.get("/v1/acl/policies")).status_code == 403
    nursery.cancel_scope.cancel()


async def test_tokens_and_policies_survive_a_restart(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        reg = await _deny_registry(nursery, data_dir=tmp_path)
        async with reg.client as anon, _client(reg, await _bootstrap(anon)) as admin:
            host = await _token_for(admin, "meshd-host-a", HOST_A_RULES)
            index = int((await admin.get("/v1/acl/tokens")).headers["X-Consul-Index"])
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        reg = await _deny_registry(nursery, data_dir=tmp_path)
        async with reg.client as anon, _client(reg, host["SecretID"]) as a:
            assert (await anon.put("/v1/acl/bootstrap")).status_code == 403
            me = (await a.get("/v1/acl/token/self")).json()
            assert me["AccessorID"] == host["AccessorID"]
            assert (await a.put("/v1/agent/service/register",
                                json={"Name": "web"})).status_code == 200
            assert (await a.put("/v1/kv/meshd/config/x", content=b"")).status_code == 403
            r = await admin_index(reg)
            assert r >= index  # the index never goes backwards
        nursery.cancel_scope.cancel()


async def test_acls_off_on_a_public_address_is_refused() -> None:
    with pytest.raises(RegistryError, match="--allow-unauthenticated"):
        await serve_registry(RegistryConfig(host="0.0.0.0", port=0))
    RegistryConfig(host="0.0.0.0", allow_unauthenticated=True).validate()
    RegistryConfig(host="0.0.0.0", acl_enabled=True).validate()
    RegistryConfig(host="::1").validate()
    with pytest.raises(RegistryError, match="needs ACLs enabled"):
        RegistryConfig(acl_initial_management="x").validate()


# The policies docs/consul-api.md §1.5 recommends, exercised with meshd's own client.
MESHD_HOST_RULES = """
service "web" { policy = "write" }
service "web-sidecar-proxy" { policy = "write" }
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
key_prefix "meshd/config/" { policy = "read" }
"""
MESHD_OPERATOR_RULES = """
key_prefix "meshd/config/" { policy = "write" }
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
"""


async def test_recommended_host_and_operator_policies(nursery: trio.Nursery) -> None:
    reg = await _deny_registry(nursery, acl_initial_management="root")
    async with _client(reg, "root") as admin:
        host = await _token_for(admin, "meshd-host-web", MESHD_HOST_RULES)
        operator = await _token_for(admin, "meshd-operator", MESHD_OPERATOR_RULES)
    async with ConsulClient(reg.url, token=host["SecretID"]) as h, \
            ConsulClient(reg.url, token=operator["SecretID"]) as op:
        assert await op.kv_put("meshd/config/routes", b"{}", cas=0)
        await h.register_service({"ID": "web-1", "Name": "web", "Port": 8080,
                                  "Check": {"CheckID": "service:web-1", "TTL": "10s"}})
        await h.register_service({
            "ID": "web-1-sidecar-proxy", "Name": "web-sidecar-proxy", "Kind": "connect-proxy",
            "Port": 21000, "Proxy": {"DestinationServiceName": "web",
                                     "DestinationServiceID": "web-1"},
            "Check": {"CheckID": "service:web-1-sidecar-proxy", "TTL": "10s"}})
        await h.update_ttl("service:web-1-sidecar-proxy", "passing")
        proxies = await h.health_connect("web")
        assert [p["Service"]["ID"] for p in proxies.data] == ["web-1-sidecar-proxy"]
        assert "web" in await h.catalog_services()
        assert (await h.kv_get("meshd/config/routes")).data is not None
        with pytest.raises(RegistryError, match="403"):
            await h.kv_put("meshd/config/routes", b'{"open": true}')
        with pytest.raises(RegistryError, match="403"):
            await op.register_service({"Name": "web"})  # operators change config, not services
    nursery.cancel_scope.cancel()
