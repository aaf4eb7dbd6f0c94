"""The mesh's ACL policies (``meshd.registry.acl_policies``) against a real registry over HTTP
with ACLs on and default deny: a host's token suffices for exactly what its meshd does (register
its services and their proxies with TTL checks, feed the checks, watch, read the config,
deregister) and for nothing else: not the mesh config, not another host's services, not another
node. The operator's writes the config and registers nothing."""

from __future__ import annotations

import httpx
import pytest
import trio
from registry_testing import start_registry

from meshd.config.host import parse_host_config
from meshd.config.schema import HostConfig
from meshd.errors import RegistryError
from meshd.registry.acl_policies import (
    OPERATOR_POLICY,
    host_policy_name,
    host_rules,
    operator_rules,
)
from meshd.registry.config_store import ROUTES_KEY
from meshd.registry.consul import ConsulClient
from meshd.registry.registration import (
    app_registration,
    check_id,
    proxy_id,
    proxy_registration,
    service_id,
)

pytestmark = pytest.mark.embedded_only("starts the embedded registry with ACLs on")


def host(node: str, address: str, service: str, port: int) -> HostConfig:
    return parse_host_config({
        "node": node, "address": address, "trust_domain": "shop.mesh",
        "ca": {"url": "https://127.0.0.1:8443", "fingerprint": "sha256:" + "ab" * 32,
               "token_file": "join-token"},
        "services": [{"name": service, "port": port}]})


def test_host_rules_are_the_documented_ones() -> None:
    assert host_rules(["web"]) == """\
service "web" { policy = "write" }
service "web-sidecar-proxy" { policy = "write" }
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
key_prefix "meshd/config/" { policy = "read" }
"""
    assert operator_rules() == """\
key_prefix "meshd/config/" { policy = "write" }
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
"""


async def _tokens(url: str) -> dict[str, str]:
    tokens = {}
    async with ConsulClient(url, token="root") as admin:
        await admin.acl_create_policy(OPERATOR_POLICY, operator_rules())
        tokens["operator"] = await admin.acl_create_token("operator", [OPERATOR_POLICY])
        for node, service in (("host-a", "web"), ("host-b", "payments")):
            await admin.acl_create_policy(host_policy_name(node), host_rules([service]))
            tokens[node] = await admin.acl_create_token(node, [host_policy_name(node)])
    return tokens


async def test_a_host_token_does_what_its_meshd_does_and_nothing_else(
        nursery: trio.Nursery) -> None:
    reg = await start_registry(nursery, acl_enabled=True, acl_default_policy="deny",
                               acl_initial_management="root")
    tokens = await _tokens(reg.url)
    a = host("host-a", "127.0.0.2", "web", 8080)
    b = host("host-b", "127.0.0.3", "payments", 9001)
    web, payments = a.services[0], b.services[0]
    async with ConsulClient(reg.url, token=tokens["host-a"]) as host_a, \
            ConsulClient(reg.url, token=tokens["host-b"]) as host_b, \
            ConsulClient(reg.url, token=tokens["operator"]) as operator:
        assert await operator.kv_put(ROUTES_KEY, b'{"destinations": {}}', cas=0)
        # what a meshd does, with the daemon's own definitions
        for consul, config, svc in ((host_a, a, web), (host_b, b, payments)):
            await consul.register_service(app_registration(config, svc, "passing"))
            await consul.register_service(proxy_registration(config, svc, "passing"))
            await consul.update_ttl(check_id(service_id(config, svc)), "passing")
            await consul.update_ttl(check_id(proxy_id(config, svc)), "passing")
        seen = await host_a.health_connect("payments", passing=True)
        assert [e["Service"]["ID"] for e in seen.data] == [proxy_id(b, payments)]
        assert (await host_a.kv_get(ROUTES_KEY)).data is not None
        assert set(await host_a.catalog_services()) >= {"web", "payments"}

        # and what it may not
        for attempt in (
            host_a.kv_put(ROUTES_KEY, b'{"destinations": {}}'),
            host_a.kv_put("meshd/config/other", b"x"),
            host_a.register_service(app_registration(a, payments)),      # another's service
            host_a.register_service(proxy_registration(a, payments)),    # ... or its proxy
            host_a.update_ttl(check_id(service_id(b, payments)), "critical"),
            host_a.deregister_service(service_id(b, payments)),
            operator.register_service(app_registration(a, web)),
        ):
            with pytest.raises(RegistryError, match="403 Permission denied"):
                await attempt
        async with httpx.AsyncClient(base_url=reg.url, trust_env=False,
                                     headers={"X-Consul-Token": tokens["host-a"]}) as raw:
            other_node = {"Node": "host-z", "Address": "127.0.0.9",
                          "Service": {"Service": "web", "Port": 8080}}
            r = await raw.put("/v1/catalog/register", json=other_node)
            assert r.status_code == 403 and "node:write" in r.text, r.text
            theirs = {"Node": reg.node, "ServiceID": service_id(b, payments)}
            r = await raw.put("/v1/catalog/deregister", json=theirs)
            assert r.status_code == 403, r.text

        await host_a.deregister_service(service_id(a, web))
        await host_a.deregister_service(proxy_id(a, web))
        assert "web" not in await operator.catalog_services()
        # the other host's entries are still there
        assert len((await host_a.health_connect("payments")).data) == 1
    nursery.cancel_scope.cancel()
