"""A real Prometheus (Debian's package, a child process) with the shipped scrape config, rules and
alerts, scraping a real mesh: two meshd daemons (one admin API on loopback, one over mutual TLS
read with an operator certificate), the embedded registry (and one with ACLs on, read with a
bearer token), and the CA (with the operator certificate). After some traffic, every query of
the shipped dashboard and every recording rule returns data, and every metric the dashboard
names is in a real scrape."""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from deploy_testing import (
    ALERTS,
    RULES,
    SCRAPE_CONFIG,
    binary,
    dashboard_queries,
    family,
    names_in,
    recorded_names,
)
from mesh_testing import Mesh, open_mesh, start_daemon, wait_for
from net_testing import free_port
from operator_testing import issue_operator
from proc_testing import stop_process

from meshd.config.parse import routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable
from meshd.httpd import Request, Response, serve_http
from meshd.registry.embedded.server import RegistryConfig, listen_port, serve_registry

TD = "prom.mesh"
HOST_A = "127.0.21.2"
HOST_B = "127.0.21.3"
MASTER = "prometheus-test-master"
REQUESTS = 60


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield await open_mesh(nursery, tmp_path, http, TD)


async def payments_app(address: str, port: int, *,
                       task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(request: Request) -> Response:
        if request.path == "/healthz":
            return Response.text("ok")
        if request.path == "/fail":
            return Response.text("no", 503)
        return Response.json({"paid": True, "size": len(request.body)})

    await serve_http(handle, address, port, task_status=task_status)


async def echo_app(address: str, port: int, *,
                   task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """TCP: sends back what it receives."""
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some():
                await stream.send_all(data)

    await trio.serve_tcp(echo, port, host=address, task_status=task_status)


def scrape_config(tmp: Path, targets: dict[str, str], files: dict[str, Path]) -> str:
    """The shipped example, pointed at this test's mesh and files, scraping every second."""
    text = SCRAPE_CONFIG.read_text()
    swaps = {"scrape_interval: 15s": "scrape_interval: 1s",
             "evaluation_interval: 15s": "evaluation_interval: 1s",
             "/etc/prometheus/meshd-rules.yml": str(RULES),
             "/etc/prometheus/meshd-alerts.yml": str(ALERTS),
             **{f"/etc/prometheus/meshd/{name}": str(path) for name, path in files.items()},
             **targets}
    for old, new in swaps.items():
        assert old in text, f"the example scrape config no longer has {old!r}"
        text = text.replace(old, new)
    settings = "\n".join(line.partition("#")[0] for line in text.splitlines())
    assert "/etc/" not in settings and "10.0.0." not in settings, settings
    return text


async def query(http: httpx.AsyncClient, url: str, expr: str) -> list[dict[str, Any]]:
    r = await http.get(f"{url}/api/v1/query", params={"query": expr})
    assert r.status_code == 200, f"{expr}: {r.text}"
    result: list[dict[str, Any]] = r.json()["data"]["result"]
    return result


async def test_prometheus_scrapes_the_mesh_for_the_dashboard_and_rules(
    mesh: Mesh, nursery: trio.Nursery, tmp_path: Path
) -> None:
    prometheus = binary("prometheus")
    # the mesh: payments (HTTP) and ledger (TCP) on host-b (admin API over mTLS), web on
    # host-a (admin API on loopback)
    app_port, ledger_port = free_port(HOST_B), free_port(HOST_B)
    await nursery.start(payments_app, HOST_B, app_port)
    await nursery.start(echo_app, HOST_B, ledger_port)
    open_table = routes_to_data(RouteTable(default_policy=DefaultPolicy.ALLOW))
    await mesh.put_routes(open_table | {"destinations": {"payments": {
        "subsets": {"v2": {"version": "v2"}}, "split": {"v2": 100}, "timeout": 2.0}}})
    b_conf = mesh.host_config("host-b", HOST_B, [{
        "name": "payments", "port": app_port, "address": HOST_B, "version": "v2",
        "health": {"http": "/healthz", "interval": "200ms"}}, {
        "name": "ledger", "port": ledger_port, "address": HOST_B, "protocol": "tcp",
        "health": {"tcp": True, "interval": "200ms"}}],
        admin={"address": f"{HOST_B}:{free_port(HOST_B)}", "tls": True})
    upstream_port, ledger_upstream = free_port("127.0.0.1"), free_port("127.0.0.1")
    a_conf = mesh.host_config("host-a", HOST_A, [{
        "name": "web", "port": free_port(HOST_A), "health": {"none": True},
        "upstreams": [{"name": "payments", "local_port": upstream_port},
                      {"name": "ledger", "local_port": ledger_upstream, "protocol": "tcp"}]}])
    await start_daemon(nursery, b_conf)
    await start_daemon(nursery, a_conf)
    a_admin = f"{a_conf.admin_host}:{a_conf.admin_port}"
    b_admin = f"{b_conf.admin_host}:{b_conf.admin_port}"
    acl_listeners = await nursery.start(serve_registry, RegistryConfig(
        host="127.0.0.1", port=0, acl_master_token=MASTER, data_dir=tmp_path / "registry"))
    acl_registry = f"127.0.0.1:{listen_port(acl_listeners)}"
    registry = mesh.registry_url.removeprefix("http://")

    # Prometheus' credentials: an operator certificate, and the registry's token
    operator = tmp_path / "prometheus-operator"
    issue_operator(mesh.ca_dir, operator, name="prometheus")
    token_file = tmp_path / "registry-token"
    token_file.write_text(MASTER + "\n")
    config = tmp_path / "prometheus.yml"
    config.write_text(scrape_config(tmp_path, {
        '"127.0.0.1:15000"': f'"{a_admin}"',
        '"10.0.0.11:15000", "10.0.0.12:15000"': f'"{b_admin}"',
        '"10.0.0.4:8500"': f'"{registry}", "{acl_registry}"',
        '"10.0.0.5:8443"': f'"{mesh.ca_url.removeprefix("https://")}"',
    }, {"ca.crt": operator / "ca.crt", "prometheus.crt": operator / "prometheus.crt",
        "prometheus.key": operator / "prometheus.key", "registry-token": token_file}))
    async def traffic(requests: int) -> None:
        """Successes, one error in ten, request bodies; TCP through ledger; writes to the
        registry with a data directory; a CA refusal."""
        for i in range(requests):
            path = "/fail" if i % 10 == 0 else "/pay"
            r = await http.post(f"http://127.0.0.1:{upstream_port}{path}", content=b"x" * 100)
            assert r.status_code in (200, 503)
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", ledger_upstream)
            async with stream:
                await stream.send_all(b"ping")
                assert await stream.receive_some() == b"ping"
        for i in range(3):
            r = await http.put(f"http://{acl_registry}/v1/kv/k{i}", content=b"v",
                               headers={"X-Consul-Token": MASTER})
            assert r.status_code == 200
        no_cert = ssl.create_default_context(cafile=operator / "ca.crt")
        async with httpx.AsyncClient(verify=no_cert, timeout=10) as ca_http:
            assert (await ca_http.get(f"{mesh.ca_url}/metrics")).status_code == 401

    # A counter's first scrape is its baseline, so every series is made before Prometheus
    # starts: a request of each kind now, the traffic once the targets have been scraped.
    http = mesh.http

    async def answered() -> bool:
        return (await http.get(f"http://127.0.0.1:{upstream_port}/pay")).status_code == 200
    await wait_for(answered)
    await traffic(10)

    url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    (tmp_path / "tsdb").mkdir()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = await trio.lowlevel.open_process(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address={url.removeprefix('http://')}",
         "--storage.tsdb.retention.time=1h"], stdout=log, stderr=log)
    try:
        # every target up (the mTLS admin API and the CA with the operator certificate, the
        # ACL'd registry with the token)
        async def all_up() -> bool:
            try:
                r = await http.get(f"{url}/api/v1/query", params={"query": "up"})
            except httpx.HTTPError:
                return False  # not listening yet
            if r.status_code != 200:
                return False  # starting (503)
            up = r.json()["data"]["result"]
            return len(up) == 5 and all(s["value"][1] == "1" for s in up)
        await wait_for(all_up, 30)
        jobs = {s["metric"]["job"] for s in await query(http, url, "up")}
        assert jobs == {"meshd", "meshd-registry", "meshd-ca"}

        # then the traffic (its series were scraped before it: rates see it)
        await traffic(REQUESTS)

        # every dashboard query and every recording rule answers (rates need two scrapes of
        # the traffic's counters, recordings an evaluation after that)
        pending = {*dashboard_queries(), *recorded_names()}

        async def all_answer() -> bool:
            for expr in sorted(pending):
                result = await query(http, url, expr)
                if result and all(not math.isnan(float(s["value"][1])) for s in result):
                    pending.discard(expr)
            return not pending
        try:
            await wait_for(all_answer, 30)
        except trio.TooSlowError:
            pytest.fail(f"no data for: {sorted(pending)}")

        reporters = {s["metric"]["reporter"] for s in await query(
            http, url, 'istio_requests_total{destination_service_name="payments"}')}
        assert reporters == {"source", "destination"}
        success = await query(http, url, 'meshd:request_success:ratio_rate1m'
                                         '{direction="outbound",destination="payments"}')
        assert [s["metric"]["subset"] for s in success] == ["v2"]
        assert 0 < float(success[0]["value"][1]) < 1  # one request in ten failed

        # every metric the dashboard names is in a real scrape of meshd, the registry or the CA
        # (the admin API's certificate names the node by SPIFFE ID only: no host name check)
        operator_tls = ssl.create_default_context(cafile=operator / "ca.crt")
        operator_tls.check_hostname = False
        operator_tls.load_cert_chain(operator / "prometheus.crt", operator / "prometheus.key")
        async with httpx.AsyncClient(verify=operator_tls, timeout=10) as tls_http:
            scraped = "\n".join([
                (await http.get(f"http://{a_admin}/metrics")).text,
                (await tls_http.get(f"https://{b_admin}/metrics")).text,
                (await http.get(f"http://{registry}/metrics")).text,
                (await tls_http.get(f"{mesh.ca_url}/metrics")).text])
        for name in sorted(names_in(dashboard_queries())):
            if ":" not in name:
                assert f"# TYPE {family(name)} " in scraped, name
        log.flush()
        assert "Evaluating rule failed" not in (tmp_path / "prometheus.log").read_text()
    finally:
        await stop_process(proc)
        log.close()

