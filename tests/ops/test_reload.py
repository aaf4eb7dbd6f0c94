"""Reloading meshd.toml: the pure plan (what is applied, what needs a restart), then SIGHUP to a
real ``meshd run``: a health-check change is applied (the app is probed at the new interval), an
invalid file is refused with one log line per problem and the daemon keeps its configuration,
and a change that needs a restart is reported key by key and not pretended."""

from __future__ import annotations

import dataclasses
import signal
import socket
from pathlib import Path
from typing import Any

import trio
from ops_testing import NotifySocket, child, write_host_toml
from test_daemon import HOST_B, Mesh, free_port, mesh

from meshd.config.parse import parse_host_config
from meshd.config.schema import HealthCheck, HostConfig
from meshd.daemon.reload import Change, plan_reload, summary
from meshd.httpd import Request, Response, serve_http

__all__ = ["mesh"]  # the fixture, imported for pytest

FP = "sha256:" + "ab" * 32


def host(**overrides: Any) -> HostConfig:
    data: dict[str, Any] = {
        "node": "host-a", "address": "10.0.0.2", "trust_domain": "shop.mesh",
        "ca": {"url": "https://ca:8443", "fingerprint": FP, "token_file": "token"},
        "services": [
            {"name": "web", "port": 8080, "health": {"http": "/healthz", "interval": "5s"},
             "upstreams": [{"name": "payments", "local_port": 9191}]},
            {"name": "cart", "port": 8081, "health": {"tcp": True}},
        ],
    }
    data.update(overrides)
    return parse_host_config(data, "meshd.toml", Path("/etc/meshd"))


def with_service(index: int, **changes: Any) -> list[dict[str, Any]]:
    services: list[dict[str, Any]] = [
        {"name": "web", "port": 8080, "health": {"http": "/healthz", "interval": "5s"},
         "upstreams": [{"name": "payments", "local_port": 9191}]},
        {"name": "cart", "port": 8081, "health": {"tcp": True}},
    ]
    services[index] = services[index] | changes
    return services


def test_same_file_changes_nothing() -> None:
    plan = plan_reload(host(), host())
    assert plan.unchanged and plan.config == host()
    assert summary(plan) == "reloaded: no change"


def test_health_changes_are_applied() -> None:
    running = host()
    loaded = host(services=with_service(0, health={"http": "/ready", "interval": "1s",
                                                   "timeout": "500ms"}))
    plan = plan_reload(running, loaded)
    assert [str(c) for c in plan.applied] == [
        "services.web.health.check: http /healthz -> http /ready",
        "services.web.health.interval: 5s -> 1s",
        "services.web.health.timeout: 2s -> 0.5s",
    ]
    assert plan.needs_restart == () and plan.health_changed == ("web",)
    assert plan.config.service("web").health == HealthCheck("http", "/ready", 1.0, 0.5)  # type: ignore[union-attr]
    assert plan.config.service("cart") == running.service("cart")
    assert summary(plan) == "reload applied 3 change(s)"


def test_restart_keys_are_reported_and_not_applied() -> None:
    running = host()
    loaded = host(node="host-z", inbound={"port": 15009}, registry="consul://10.0.0.9:8500",
                  admin={"address": "127.0.0.1:15005"},
                  services=with_service(0, port=8088))
    plan = plan_reload(running, loaded)
    assert plan.applied == ()
    assert [str(c) for c in plan.needs_restart] == [
        "node: host-a -> host-z",
        "registry: http://127.0.0.1:8500 -> http://10.0.0.9:8500",
        "inbound.port: 15001 -> 15009",
        "admin.address: 127.0.0.1:15000 -> 127.0.0.1:15005",
        "services.web.port: 8080 -> 8088",
    ]
    assert plan.needs_restart[2].restart_reason == "the inbound mTLS listener is bound at start"
    assert plan.config == running  # nothing pretended
    assert summary(plan).startswith("RESTART NEEDED for node, registry, inbound.port")


def test_upstreams_are_added_removed_and_replaced_live() -> None:
    running = host()
    loaded = host(services=with_service(0, upstreams=[
        {"name": "payments", "local_port": 9999}, {"name": "search", "local_port": 9393}]))
    plan = plan_reload(running, loaded)
    assert plan.needs_restart == ()
    assert [str(c) for c in plan.applied] == [
        "services.web.upstreams.payments: local_port 9191 http -> local_port 9999 http",
        "services.web.upstreams.search: (absent) -> local_port 9393 http",
    ]
    # a changed upstream is replaced: its old listener drains, the new one opens
    assert plan.upstreams_removed == (("web", "payments"),)
    assert plan.upstreams_added == (("web", "payments"), ("web", "search"))
    assert plan.config.service("web") == loaded.service("web")
    back = plan_reload(plan.config, running)
    assert back.upstreams_removed == (("web", "payments"), ("web", "search"))
    assert back.upstreams_added == (("web", "payments"),)


def test_services_are_added_and_removed_live_with_health() -> None:
    running = host()
    loaded = host(services=[
        {"name": "web", "port": 8080, "health": {"http": "/healthz", "interval": "2s"},
         "upstreams": [{"name": "payments", "local_port": 9191}]},
        {"name": "search", "port": 8090, "upstreams": [{"name": "web", "local_port": 9292}]},
    ])
    plan = plan_reload(running, loaded)
    assert [str(c) for c in plan.applied] == [
        "services.web.health.interval: 5s -> 2s", "services.cart: port 8081 -> (absent)",
        "services.search: (absent) -> port 8090"]
    assert plan.needs_restart == ()
    assert plan.services_added == ("search",) and plan.services_removed == ("cart",)
    assert plan.upstreams_added == (("search", "web"),) and plan.upstreams_removed == ()
    assert [s.name for s in plan.config.services] == ["web", "search"]
    assert summary(plan) == "reload applied 3 change(s)"
    assert Change("k", "a", "b") == dataclasses.replace(Change("k", "a", "x"), new="b")


def test_a_permissive_service_is_added_or_removed_only_by_a_restart() -> None:
    running = host()
    loaded = host(services=[*with_service(0), {"name": "legacy", "port": 8095,
                                               "mtls": "permissive"}])
    plan = plan_reload(running, loaded)
    assert plan.applied == () and plan.services_added == ()
    assert [c.key for c in plan.needs_restart] == ["services.legacy"]
    assert "permissive" in plan.needs_restart[0].restart_reason
    assert plan.config == running


# -- SIGHUP to a real meshd run -----------------------------------------------------------------

async def counting_app(
    address: str, port: int, hits: list[float],
    *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def handle(request: Request) -> Response:
        if request.path == "/healthz":
            hits.append(trio.current_time())
        return Response.text("ok")

    await serve_http(handle, address, port, task_status=task_status)


def listening(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


async def test_sighup_applies_refuses_and_reports(
    mesh: Mesh, nursery: trio.Nursery, listener: NotifySocket,
) -> None:
    hits: list[float] = []
    app_port = free_port(HOST_B)
    await nursery.start(counting_app, HOST_B, app_port, hits)
    conf = mesh.host_config("host-b", HOST_B, [{"name": "payments", "port": app_port}])
    ports = {"inbound": conf.inbound_port, "admin": conf.admin_port}
    toml = conf.ca.token_file.parent / "meshd.toml"
    write_host_toml(mesh, toml, ports, app_port, interval="5s")
    log = toml.parent / "meshd.log"

    async def reload_status(proc: trio.Process) -> str:
        proc.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            await listener.wait_for("RELOADING", "1")
            return (await listener.wait_for("READY", "1")).fields["STATUS"]

    async with child("meshd.service", ["run", "--config", str(toml)], listener.environ(),
                     log) as proc:
        await listener.wait_for("READY", "1")

        # 1. a valid health change is applied: probes every 100 ms instead of every 5 s
        write_host_toml(mesh, toml, ports, app_port, interval="100ms")
        status = await reload_status(proc)
        assert status.endswith("; reload applied 1 change(s)"), status
        applied_at = trio.current_time()
        await trio.sleep(1.0)
        assert len([t for t in hits if t > applied_at]) >= 5, hits

        # 2. an invalid file is refused, one line per problem; the daemon keeps its config
        write_host_toml(mesh, toml, ports, app_port, interval="100ms",
                        inbound={"port": 70000}, trust_domain="Not A Domain")
        status = await reload_status(proc)
        assert "reload refused: 2 problem(s) in" in status, status
        refused_at = trio.current_time()
        await trio.sleep(0.5)
        assert len([t for t in hits if t > refused_at]) >= 2  # still the applied 100 ms
        assert listening(HOST_B, conf.inbound_port)

        # 3. keys that need a restart are reported, and the running values stay
        new_port = free_port(HOST_B)
        write_host_toml(mesh, toml, ports | {"inbound": new_port}, app_port, interval="100ms")
        status = await reload_status(proc)
        assert "RESTART NEEDED for inbound.port" in status, status
        assert listening(HOST_B, conf.inbound_port) and not listening(HOST_B, new_port)

        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0

    text = await trio.Path(log).read_text()
    assert "reload applied services.payments.health.interval: 5s -> 0.1s" in text
    refused = [line for line in text.splitlines() if "reload refused: " in line]
    assert any("trust_domain: invalid trust domain 'Not A Domain'" in line for line in refused)
    assert any("inbound.port: port 70000 out of range" in line for line in refused)
    assert (f"reload cannot apply inbound.port: {conf.inbound_port} -> {new_port} without a "
            "restart; the running value stays") in text
    assert "1 change(s) need a restart to take effect (systemctl restart meshd)" in text
