"""Two real `meshd run` child processes with ``--log-format json`` (the embedded registry and the
CA in this process): host-a (web, upstream payments) takes its access log format from meshd.toml
(``json``), host-b (payments) from ``MESHD_ACCESS_LOG=json``, which wins over its file's
``envoy``. Every line either writes, on stdout or stderr, parses with ``json.loads``; a
request's two access lines share its trace and link their spans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomlkit
import trio
from mesh_testing import Mesh, open_mesh
from net_testing import free_port
from proc_testing import stop_process

from meshd.config.parse import routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable
from meshd.httpd import Request, Response, serve_http

TD = "logs.mesh"
HOST_A = "127.0.24.2"
HOST_B = "127.0.24.3"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield await open_mesh(nursery, tmp_path, http, TD)


async def payments_app(address: str, port: int, *,
                       task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(request: Request) -> Response:
        return Response.text("ok" if request.path == "/healthz" else "paid")

    await serve_http(handle, address, port, task_status=task_status)


def _write_config(mesh: Mesh, node: str, address: str, services: list[dict[str, Any]],
                  access_format: str) -> tuple[Path, str]:
    """meshd.toml for a child (its join token minted by ``host_config``); and its admin URL."""
    conf = mesh.host_config(node, address, services)
    data = {
        "node": node, "address": address, "trust_domain": TD, "registry": mesh.registry_url,
        "state_dir": "state",
        "ca": {"url": mesh.ca_url, "fingerprint": mesh.fingerprint, "token_file": "join-token"},
        "inbound": {"port": conf.inbound_port},
        "admin": {"address": f"{conf.admin_host}:{conf.admin_port}"},
        "access_log": {"format": access_format},
        "services": services,
    }
    path = conf.ca.token_file.parent / "meshd.toml"
    path.write_text(tomlkit.dumps(data))
    return path, f"http://{conf.admin_host}:{conf.admin_port}"


async def _ready(http: httpx.AsyncClient, admin: str, log: Path) -> None:
    with trio.move_on_after(30):
        while True:
            try:
                if (await http.get(f"{admin}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.1)
    raise AssertionError(f"not ready within 30 s:\n{await trio.Path(log).read_text()}")


def _all_logged(logs: Iterable[Path], text: str) -> bool:
    return all(text in log.read_text() for log in logs)


async def test_json_daemon_and_access_lines_of_real_processes_all_parse(
        mesh: Mesh, nursery: trio.Nursery) -> None:
    app_port = free_port(HOST_B)
    await nursery.start(payments_app, HOST_B, app_port)
    open_table = routes_to_data(RouteTable(default_policy=DefaultPolicy.ALLOW))
    await mesh.put_routes(open_table | {"destinations": {"payments": {
        "subsets": {"v1": {"version": "v1"}}, "split": {"v1": 100}}}})
    b_toml, b_admin = _write_config(mesh, "host-b", HOST_B, [{
        "name": "payments", "port": app_port, "address": HOST_B, "version": "v1",
        "health": {"http": "/healthz", "interval": "200ms"}}], "envoy")
    upstream_port = free_port("127.0.0.1")
    a_toml, a_admin = _write_config(mesh, "host-a", HOST_A, [{
        "name": "web", "port": free_port(HOST_A), "health": {"none": True},
        "upstreams": [{"name": "payments", "local_port": upstream_port}]}], "json")

    env = {k: v for k, v in os.environ.items() if k not in ("MESHD_ACCESS_LOG",
                                                            "MESHD_LOG_FORMAT")}
    logs = {"a": a_toml.parent / "out.log", "b": b_toml.parent / "out.log"}
    procs: list[trio.Process] = []
    try:
        for name, toml, extra in (("b", b_toml, {"MESHD_ACCESS_LOG": "json"}), ("a", a_toml, {})):
            with logs[name].open("wb") as out:
                procs.append(await trio.lowlevel.open_process(
                    [sys.executable, "-m", "meshd", "--log-format", "json", "run", "--config",
                     str(toml)], stdout=out, stderr=subprocess.STDOUT, env=env | extra))
        await _ready(mesh.http, b_admin, logs["b"])
        await _ready(mesh.http, a_admin, logs["a"])

        url = f"http://127.0.0.1:{upstream_port}/pay"
        status = 0
        with trio.move_on_after(20):
            for _ in range(200):  # until host-a knows payments' endpoint
                status = (await mesh.http.get(url, headers={"x-request-id": "warm-up"})
                          ).status_code
                if status == 200:
                    break
                await trio.sleep(0.1)
        assert status == 200, logs["a"].read_text()[-3000:]
        r = await mesh.http.post(url, content=b"z" * 300, headers={
            "x-request-id": "child-1", "traceparent": f"00-{TRACE}-{APP_SPAN}-01",
            "user-agent": "child-test/1"})
        assert r.status_code == 200 and r.text == "paid"
        with trio.fail_after(10):
            while not _all_logged(logs.values(), '"child-1"'):  # noqa: ASYNC110 - other processes
                await trio.sleep(0.05)
    finally:
        for proc in procs:
            await stop_process(proc)

    access: dict[str, dict[str, Any]] = {}
    for name, log in logs.items():
        lines = log.read_text().splitlines()
        assert lines
        daemon_lines = 0
        for line in lines:
            entry = json.loads(line)  # every line, daemon's and access log's alike
            assert isinstance(entry, dict)
            if "logger" in entry:
                assert {"timestamp", "level", "logger", "message"} <= set(entry)
                daemon_lines += 1
            elif entry["request_id"] == "child-1":
                access[name] = entry
        assert daemon_lines > 0
    out, into = access["a"], access["b"]
    assert (out["direction"], into["direction"]) == ("outbound", "inbound")
    assert out["trace_id"] == into["trace_id"] == TRACE
    assert out["parent_span_id"] == APP_SPAN and into["parent_span_id"] == out["span_id"]
    assert out["bytes_received"] == into["bytes_received"] == 300
    assert out["bytes_sent"] == into["bytes_sent"] == len("paid")
    assert out["user_agent"] == into["user_agent"] == "child-test/1"
    assert (out["status"], into["status"], into["source"]) == (200, 200, "web")
