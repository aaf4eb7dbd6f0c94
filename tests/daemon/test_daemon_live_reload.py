"""A reload adds and removes services and upstreams in a running meshd, over real parts (the
embedded registry, the CA, two daemons, real apps): under a bounded load through an existing
upstream (50 requests/s), a reload adds a service (its certificate asked with the node
certificate) with an upstream, with no failed request; the new upstream serves (over mTLS with
the new service's identity); a reload removing them closes the listener while a request in
flight on it finishes (drain), still with no failed request on the other upstream. A service
the CA will not issue for is refused with the CA's reason, and the running config stays."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomlkit
import trio
from mesh_testing import Mesh, open_mesh, start_daemon, wait_for
from net_testing import free_port

from meshd.cli.status import render
from meshd.config.load import load_host_config
from meshd.config.parse import routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable
from meshd.daemon.reload import reload_from_file
from meshd.httpd import Request, Response, serve_http

TD = "reload.mesh"
HOST_A = "127.0.22.2"
HOST_B = "127.0.22.3"
RATE = 50          # requests per second through the existing upstream
MAX_REQUESTS = 400  # the load loop's bound in count (and it stops when the test is done)


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield await open_mesh(nursery, tmp_path, http, TD)


async def payments_app(address: str, port: int, *,
                       task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(request: Request) -> Response:
        if request.path == "/slow":
            await trio.sleep(1.0)
        return Response.json({"service": "payments", "source": request.header("x-meshd-source"),
                              "path": request.path})

    await serve_http(handle, address, port, task_status=task_status)


async def ok_app(address: str, port: int, *,
                 task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(request: Request) -> Response:
        return Response.text("ok")

    await serve_http(handle, address, port, task_status=task_status)


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


class Load:
    """Requests at ``RATE``/s through one upstream until stopped (bounded in count)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = self.failed = 0
        self.errors: list[str] = []
        self.done = trio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            while not self.done.is_set() and self.sent < MAX_REQUESTS:
                self.sent += 1
                try:
                    r = await client.get(self.url)
                    if r.status_code != 200:
                        self.failed += 1
                        self.errors.append(f"{r.status_code} {r.text[:100]}")
                except httpx.HTTPError as exc:
                    self.failed += 1
                    self.errors.append(repr(exc))
                await trio.sleep(1 / RATE)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_reload_adds_and_removes_a_service_and_an_upstream_under_load(
    mesh: Mesh, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, workers: str,
) -> None:
    """The same with worker processes (``workers = 2``): the reload reaches every worker
    (a listener added in each, and closed in each)."""
    monkeypatch.setenv("MESHD_WORKERS", workers)
    await mesh.put_routes(routes_to_data(RouteTable(default_policy=DefaultPolicy.ALLOW))
                          | {"destinations": {"payments": {"timeout": 5.0}}})
    pay_port, web_port, reports_port = free_port(HOST_B), free_port(HOST_A), free_port(HOST_A)
    await nursery.start(payments_app, HOST_B, pay_port)
    await nursery.start(ok_app, HOST_A, web_port)
    await nursery.start(ok_app, HOST_A, reports_port)
    b_conf = mesh.host_config("host-b", HOST_B, [{"name": "payments", "port": pay_port,
                                                  "address": HOST_B}])
    await start_daemon(nursery, b_conf)

    web_up, reports_up = free_port("127.0.0.1"), free_port("127.0.0.1")
    web = {"name": "web", "port": web_port, "address": HOST_A,
           "upstreams": [{"name": "payments", "local_port": web_up}]}
    reports = {"name": "reports", "port": reports_port, "address": HOST_A,
               "health": {"http": "/", "interval": "200ms"},
               "upstreams": [{"name": "payments", "local_port": reports_up}]}
    # the join token names both services: the node may claim reports later
    first = mesh.host_config("host-a", HOST_A, [web, reports])
    data: dict[str, Any] = {
        "node": "host-a", "address": HOST_A, "trust_domain": TD,
        "registry": mesh.registry_url, "state_dir": "state", "drain_timeout": "5s",
        "ca": {"url": mesh.ca_url, "fingerprint": mesh.fingerprint,
               "token_file": "join-token"},
        "inbound": {"port": first.inbound_port},
        "admin": {"address": f"{first.admin_host}:{first.admin_port}"},
        "services": [web],
    }
    toml = mesh.tmp / "host-a" / "meshd.toml"
    toml.write_text(tomlkit.dumps(data))
    daemon = await start_daemon(nursery, load_host_config(toml))
    admin = f"http://{first.admin_host}:{first.admin_port}"

    async def serves(port: int) -> bool:
        try:
            r = await mesh.http.get(f"http://127.0.0.1:{port}/pay")
        except httpx.HTTPError:
            return False
        return r.status_code == 200
    await wait_for(lambda: serves(web_up))
    assert refused(reports_up)

    load = Load(f"http://127.0.0.1:{web_up}/pay")
    async with trio.open_nursery() as loading:
        loading.start_soon(load.run)
        await trio.sleep(0.5)

        # add: the service reports (a certificate with the node certificate) and its upstream
        toml.write_text(tomlkit.dumps(data | {"services": [web, reports]}))
        plan = await reload_from_file(daemon, toml)
        assert plan is not None and plan.failed == () and plan.needs_restart == ()
        assert plan.services_added == ("reports",)
        assert plan.upstreams_added == (("reports", "payments"),)
        assert "reports" in daemon.state.identities
        await wait_for(lambda: serves(reports_up))
        r = await mesh.http.get(f"http://127.0.0.1:{reports_up}/pay")
        assert r.json() == {"service": "payments", "source": "reports", "path": "/pay"}

        async def registered() -> bool:
            r = await mesh.http.get(f"{mesh.registry_url}/v1/health/service/reports",
                                    params={"passing": "1"})
            return len(r.json()) == 1
        await wait_for(registered)
        state = (await mesh.http.get(f"{admin}/v1/state")).json()
        assert [s["name"] for s in state["services"]] == ["web", "reports"]
        assert state["reload"]["result"] == "applied"
        assert {c["key"] for c in state["reload"]["applied"]} == {"services.reports"}

        # remove: a request in flight on the removed listener finishes; new ones are refused
        slow_answer: list[int] = []

        async def slow() -> None:
            async with httpx.AsyncClient(timeout=10) as client:
                slow_answer.append(
                    (await client.get(f"http://127.0.0.1:{reports_up}/slow")).status_code)
        loading.start_soon(slow)
        await trio.sleep(0.3)  # (the request is in flight: the app answers after 1 s)
        toml.write_text(tomlkit.dumps(data))
        plan = await reload_from_file(daemon, toml)
        assert plan is not None and plan.services_removed == ("reports",)
        assert plan.upstreams_removed == (("reports", "payments"),)
        assert refused(reports_up)
        await wait_for(lambda: trio.to_thread.run_sync(lambda: bool(slow_answer)))
        assert slow_answer == [200]

        async def deregistered() -> bool:
            r = await mesh.http.get(f"{mesh.registry_url}/v1/health/service/reports")
            return r.json() == []
        await wait_for(deregistered)
        await trio.sleep(0.5)  # (its reporter probed every 200 ms: it registers nothing again)
        assert await deregistered()
        assert "reports" not in daemon.state.health
        load.done.set()

    assert load.sent >= 50, load.sent
    assert load.failed == 0, (load.failed, load.sent, load.errors[:5])
    print(f"\nlive reload under load: {load.failed}/{load.sent} failed")
    await daemon.stop()


async def test_a_service_the_ca_does_not_allow_is_refused_and_the_rest_stays(
    mesh: Mesh, nursery: trio.Nursery,
) -> None:
    web_port, extra_port = free_port(HOST_A), free_port(HOST_A)
    await nursery.start(ok_app, HOST_A, web_port)
    web = {"name": "web", "port": web_port, "address": HOST_A}
    first = mesh.host_config("host-a", HOST_A, [web])  # the token names web only
    data: dict[str, Any] = {
        "node": "host-a", "address": HOST_A, "trust_domain": TD,
        "registry": mesh.registry_url, "state_dir": "state",
        "ca": {"url": mesh.ca_url, "fingerprint": mesh.fingerprint,
               "token_file": "join-token"},
        "inbound": {"port": first.inbound_port},
        "admin": {"address": f"{first.admin_host}:{first.admin_port}"},
        "services": [web],
    }
    toml = mesh.tmp / "host-a" / "meshd.toml"
    toml.write_text(tomlkit.dumps(data))
    toml.with_name("running.toml").write_text(tomlkit.dumps(data))
    daemon = await start_daemon(nursery, load_host_config(toml))
    extra_up = free_port("127.0.0.1")
    taken = socket.socket()  # an upstream port some other program listens on
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with taken:
        toml.write_text(tomlkit.dumps(data | {"services": [
            web | {"upstreams": [{"name": "payments",
                                  "local_port": taken.getsockname()[1]}]},
            {"name": "billing", "port": extra_port, "address": HOST_A,
             "upstreams": [{"name": "payments", "local_port": extra_up}]}]}))
        plan = await reload_from_file(daemon, toml)
    assert plan is not None
    assert [c.key for c in plan.failed] == ["services.billing", "services.web.upstreams.payments"]
    assert "node 'host-a' may not claim service 'billing'" in plan.failed[0].note
    assert "cannot listen on 127.0.0.1:" in plan.failed[1].note
    assert plan.applied == () and daemon.config.services == load_host_config(
        toml.with_name("running.toml")).services
    assert refused(extra_up)
    state = (await mesh.http.get(
        f"http://{first.admin_host}:{first.admin_port}/v1/state")).json()
    assert state["reload"]["failed"][0]["key"] == "services.billing"
    assert "may not claim service 'billing'" in state["reload"]["failed"][0]["reason"]
    screen = render(state)
    assert "COULD NOT APPLY 2 change(s)" in screen and "  services.billing: " in screen
    await daemon.stop()
