"""The daemon's lifetime tree over real parts, in one process: the embedded registry and the CA on
loopback ports, two meshd daemons (host-a runs `web` with an upstream to `payments`; host-b runs
`payments`), a real payments app, and real HTTP through host-a's outbound listener."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from mesh_testing import Mesh, open_mesh, start_daemon, wait_for
from net_testing import free_port

from meshd.config.parse import routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable
from meshd.httpd import Request, Response, serve_http

TD = "test.mesh"
HOST_A = "127.0.20.2"
HOST_B = "127.0.20.3"


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield await open_mesh(nursery, tmp_path, http, TD)


async def payments_app(
    address: str, port: int, version: str,
    *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def handle(request: Request) -> Response:
        if request.path == "/healthz":
            return Response.text("ok")
        return Response.json({"service": "payments", "version": version,
                              "source": request.header("x-meshd-source"),
                              "path": request.path})

    await serve_http(handle, address, port, task_status=task_status)


async def test_two_hosts_route_register_report_and_deregister(
    mesh: Mesh, nursery: trio.Nursery
) -> None:
    app_port = free_port(HOST_B)
    await nursery.start(payments_app, HOST_B, app_port, "v2")
    open_table = routes_to_data(RouteTable(default_policy=DefaultPolicy.ALLOW))
    await mesh.put_routes(open_table | {"destinations": {"payments": {
        "subsets": {"v2": {"version": "v2"}}, "split": {"v2": 100}, "timeout": 2.0}}})

    b_conf = mesh.host_config("host-b", HOST_B, [{
        "name": "payments", "port": app_port, "address": HOST_B, "version": "v2",
        "health": {"http": "/healthz", "interval": "200ms"}}])
    upstream_port = free_port("127.0.0.1")
    a_conf = mesh.host_config("host-a", HOST_A, [{
        "name": "web", "port": free_port(HOST_A), "health": {"none": True},
        "upstreams": [{"name": "payments", "local_port": upstream_port}]}])

    host_b = await start_daemon(nursery, b_conf)
    host_a = await start_daemon(nursery, a_conf)

    # the registry sees payments (app + connect-proxy), passing, with the version in Meta
    async def payments_passing() -> bool:
        r = await mesh.http.get(f"{mesh.registry_url}/v1/health/service/payments",
                                params={"passing": "1"})
        return len(r.json()) == 1
    await wait_for(payments_passing)
    entry = (await mesh.http.get(f"{mesh.registry_url}/v1/health/connect/payments")).json()[0]
    assert entry["Service"]["Port"] == b_conf.inbound_port
    assert entry["Service"]["Meta"]["version"] == "v2"

    # keys stay on the host, 0600
    key = b_conf.state_dir / "certs" / "payments.key"
    assert key.stat().st_mode & 0o777 == 0o600

    # a real request through host-a's outbound listener, over mTLS to host-b
    async def answered() -> bool:
        r = await mesh.http.get(f"http://127.0.0.1:{upstream_port}/pay")
        return r.status_code == 200
    await wait_for(answered)
    r = await mesh.http.get(f"http://127.0.0.1:{upstream_port}/pay")
    assert r.json() == {"service": "payments", "version": "v2", "source": "web", "path": "/pay"}

    # admin: state and metrics on host-a
    admin_a = f"http://{a_conf.admin_host}:{a_conf.admin_port}"
    state = (await mesh.http.get(f"{admin_a}/v1/state")).json()
    assert state["ready"] is True and state["node"] == "host-a"
    eps = state["destinations"]["payments"]["endpoints"]
    assert [(e["node"], e["version"], e["healthy"]) for e in eps] == [("host-b", "v2", True)]
    assert eps[0]["ejected"] is False and eps[0]["active_requests"] == 0  # from the proxy
    assert state["connections"]["outbound"] >= 1  # this client's keep-alive connection
    assert state["certificates"][0]["spiffe_id"] == f"spiffe://{TD}/svc/web"
    assert state["routes"]["destinations"]["payments"]["split"] == {"v2": 100}
    metrics = (await mesh.http.get(f"{admin_a}/metrics")).text
    assert ('meshd_requests_total{code="200",destination="payments",direction="outbound",'
            'grpc_status="",mtls="true",source="web",subset="v2"}') in metrics
    assert (await mesh.http.get(f"{admin_a}/readyz")).status_code == 200

    # an invalid route table is refused with its reason; the one in force stays, traffic flows
    generation = state["generation"]
    await mesh.put_routes({"destinations": {"payments": {
        "subsets": {"v2": {"version": "v2"}}, "split": {"v2": 95}}}})

    async def rejected() -> bool:
        s = (await mesh.http.get(f"{admin_a}/v1/state")).json()
        return bool(s["config_error"])
    await wait_for(rejected)
    state = (await mesh.http.get(f"{admin_a}/v1/state")).json()
    assert "destinations.payments.split: weights sum to 95, must sum to 100" in \
        state["config_error"]
    assert state["generation"] == generation
    r = await mesh.http.get(f"http://127.0.0.1:{upstream_port}/pay")
    assert r.status_code == 200

    # the app goes down: its check goes critical, and host-a stops routing to it (503)
    # (covered by the proxy tests for the routing part); here: stop() deregisters
    await host_b.stop()

    async def payments_gone() -> bool:
        r = await mesh.http.get(f"{mesh.registry_url}/v1/health/service/payments")
        return r.json() == []
    await wait_for(payments_gone)
    gone = (await mesh.http.get(f"{mesh.registry_url}/v1/agent/services")).json()
    assert not any(s["Service"].startswith("payments") for s in gone.values())

    async def host_a_sees_none() -> bool:
        r = await mesh.http.get(f"http://127.0.0.1:{upstream_port}/pay")
        return r.status_code == 503
    await wait_for(host_a_sees_none)
    await host_a.stop()


async def test_registry_outage_keeps_last_known_endpoints(mesh: Mesh) -> None:
    """Start with a registry, then point a watcher at a dead one: the status goes stale, the
    view keeps what it had (the proxy tests show the proxy routes from the view)."""
    from meshd.registry.consul import ConsulClient
    from meshd.registry.watch import WatchStatus, watch_endpoints

    dead = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    status = WatchStatus("endpoints/payments")
    seen: list[object] = []
    async with ConsulClient(dead) as client, trio.open_nursery() as nursery:
        nursery.start_soon(partial(watch_endpoints, client, "payments", seen.append, status))
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert seen == []
    assert status.failing_since is not None and "payments" in status.name
    assert status.staleness(trio.current_time()) > 0.5
    assert "127.0.0.1" in status.last_error


async def test_meshd_run_process_sigterm_deregisters_and_exits_zero(
    mesh: Mesh, nursery: trio.Nursery
) -> None:
    """`meshd run` as a real child process: ready, registered, then SIGTERM -> deregistered,
    exit 0, and its listeners are closed."""
    import signal
    import subprocess
    import sys

    app_port = free_port(HOST_B)
    await nursery.start(payments_app, HOST_B, app_port, "v1")
    conf = mesh.host_config("host-b", HOST_B, [{
        "name": "payments", "port": app_port, "address": HOST_B, "version": "v1",
        "health": {"http": "/healthz", "interval": "200ms"}}])
    toml = conf.ca.token_file.parent / "meshd.toml"
    toml.write_text(
        f'node = "host-b"\naddress = "{HOST_B}"\ntrust_domain = "{TD}"\n'
        f'registry = "{mesh.registry_url}"\nstate_dir = "state"\n'
        f'[ca]\nurl = "{mesh.ca_url}"\nfingerprint = "{mesh.fingerprint}"\n'
        f'token_file = "join-token"\n[inbound]\nport = {conf.inbound_port}\n'
        f'[admin]\naddress = "{conf.admin_host}:{conf.admin_port}"\n'
        f'[[services]]\nname = "payments"\nport = {app_port}\naddress = "{HOST_B}"\n'
        f'version = "v1"\nhealth = {{ http = "/healthz", interval = "200ms" }}\n')
    log = toml.parent / "meshd.log"
    with log.open("wb") as out:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "meshd", "run", "--config", str(toml)],
            stdout=out, stderr=subprocess.STDOUT)
        try:
            admin = f"http://{conf.admin_host}:{conf.admin_port}"

            async def ready() -> bool:
                try:
                    return (await mesh.http.get(f"{admin}/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False
            with trio.fail_after(30):
                while not await ready():  # noqa: ASYNC110 - another process
                    await trio.sleep(0.1)
            services = (await mesh.http.get(f"{mesh.registry_url}/v1/agent/services")).json()
            assert {"payments-host-b", "payments-host-b-sidecar-proxy"} <= set(services)

            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = log.read_text()
    assert code == 0, text
    assert "deregistered payments-host-b" in text
    services = (await mesh.http.get(f"{mesh.registry_url}/v1/agent/services")).json()
    assert not any(k.startswith("payments") for k in services), services
    with pytest.raises(OSError), socket.create_connection((HOST_B, conf.inbound_port), 1):
        pass
