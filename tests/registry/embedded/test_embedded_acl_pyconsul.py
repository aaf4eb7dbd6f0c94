"""py-consul's ACL API against a real ``meshd registry serve`` child process: the flows a mesh
operator and a meshd host go through, with Consul's exceptions."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import consul
import httpx
import pytest
import trio
from net_testing import free_port

pytestmark = pytest.mark.embedded_only("starts `meshd registry serve` with ACL flags")

HOST_RULES = {
    "key_prefix": {"meshd/config/": {"policy": "read"}},
    "service": {"web": {"policy": "write"}},
    "node": {"host-a": {"policy": "write"}},
}


def _serve(port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshd", "registry", "serve", "--http", f"127.0.0.1:{port}",
         "--acl-enabled", "--acl-default-policy", "deny"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            while True:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                try:
                    client.get("/v1/status/leader")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "registry did not start"
                    time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def _operator_and_host_flows(port: int) -> None:
    anon = consul.Consul(host="127.0.0.1", port=port)
    root = anon.acl.bootstrap()
    with pytest.raises(consul.ACLPermissionDenied, match="bootstrap no longer allowed"):
        anon.acl.bootstrap()
    admin = consul.Consul(host="127.0.0.1", port=port, token=root["SecretID"])

    policy = admin.acl.policy.create("meshd-host-a", rules=HOST_RULES,
                                     description="meshd on host-a")
    assert admin.acl.policy.read(policy["ID"])["Name"] == "meshd-host-a"
    assert {p["Name"] for p in admin.acl.policy.list()} == {"global-management",
                                                              "meshd-host-a"}
    token = admin.acl.token.create(description="host-a", policies_name=["meshd-host-a"])
    assert token["Policies"] == [{"ID": policy["ID"], "Name": "meshd-host-a"}]
    assert token["AccessorID"] in {t["AccessorID"] for t in admin.acl.token.list()}
    assert admin.kv.put("meshd/config/routes", "{}")

    host = consul.Consul(host="127.0.0.1", port=port, token=token["SecretID"])
    assert host.acl.token.read_self()["AccessorID"] == token["AccessorID"]
    assert host.agent.service.register("web", service_id="web-1", port=8080)
    assert host.kv.get("meshd/config/routes")[1]["Value"] == b"{}"
    with pytest.raises(consul.ACLPermissionDenied, match="lacks permission 'key:write'"):
        host.kv.put("meshd/config/routes", '{"open": true}')
    with pytest.raises(consul.ACLPermissionDenied, match="'service:write' on \"payments\""):
        host.agent.service.register("payments")
    with pytest.raises(consul.ACLPermissionDenied, match="'node:write' on \"host-b\""):
        host.catalog.register("host-b", "10.0.0.2", service={"Service": "web"})
    with pytest.raises(consul.ACLPermissionDenied, match="acl:read"):
        host.acl.token.list()
    with pytest.raises(consul.ACLPermissionDenied, match="anonymous token"):
        anon.kv.put("meshd/config/routes", "{}")
    assert [s for s in admin.agent.services()] == ["web-1"]

    assert admin.acl.token.delete(token["AccessorID"])
    with pytest.raises(consul.ACLPermissionDenied, match="ACL not found"):
        host.kv.get("meshd/config/routes")
    assert admin.acl.policy.delete(policy["ID"])


async def test_pyconsul_acl_flows_against_meshd_registry_serve() -> None:
    def scenario() -> None:
        port = free_port()
        for _ in _serve(port):
            _operator_and_host_flows(port)

    await trio.to_thread.run_sync(scenario)


async def test_cli_refuses_a_public_address_without_acls() -> None:
    def run(*flags: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "meshd", "registry", "serve", "--http",
                               f"0.0.0.0:{free_port()}", *flags], capture_output=True,
                              timeout=20)

    result = await trio.to_thread.run_sync(run)
    assert result.returncode == 1
    assert b"refusing to listen on 0.0.0.0 with ACLs off" in result.stderr
