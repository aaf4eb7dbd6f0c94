"""Run by test_daemon_lazy_imports.py in a child Python (``sys.modules`` cannot be read from
outside a process): the embedded registry, the CA and two daemons in this process, one HTTP/1.1
request through host-a's outbound listener over mTLS to host-b, then host-a's ``/v1/state``
(prepared as ``meshd run`` prepares its process).
Prints, as JSON, the answers' statuses and which of the lazily loaded packages are loaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import trio
from mesh_testing import open_mesh, start_daemon, wait_for
from net_testing import free_port

from meshd.config.parse import routes_to_data
from meshd.config.schema import DefaultPolicy, RouteTable
from meshd.daemon.process import import_httpcore_without_h2
from meshd.httpd import Request, Response, serve_http

HOST_A, HOST_B = "127.0.21.2", "127.0.21.3"
# what a meshd with only HTTP/1.1 services and tracing off should never load
LAZY = ("h2.connection", "hpack", "opentelemetry.proto.trace.v1.trace_pb2")


async def app(request: Request) -> Response:
    return Response.text("ok")


async def main(tmp: Path) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http, trio.open_nursery() as nursery:
        mesh = await open_mesh(nursery, tmp, http, "lazy.mesh")
        app_port = free_port(HOST_B)
        await nursery.start(serve_http, app, HOST_B, app_port)
        open_table = routes_to_data(RouteTable(default_policy=DefaultPolicy.ALLOW))
        await mesh.put_routes(open_table | {"destinations": {"payments": {"timeout": 2.0}}})
        upstream_port = free_port("127.0.0.1")
        host_b = mesh.host_config("host-b", HOST_B, [{
            "name": "payments", "port": app_port, "address": HOST_B,
            "health": {"none": True}}])
        host_a = mesh.host_config("host-a", HOST_A, [{
            "name": "web", "port": free_port(HOST_A), "health": {"none": True},
            "upstreams": [{"name": "payments", "local_port": upstream_port}]}])
        await start_daemon(nursery, host_b)
        await start_daemon(nursery, host_a)
        url = f"http://127.0.0.1:{upstream_port}/pay"

        async def answered() -> bool:
            return (await http.get(url)).status_code == 200
        await wait_for(answered, limit=15)
        status = (await http.get(url)).status_code
        admin = f"http://{host_a.admin_host}:{host_a.admin_port}/v1/state"
        state = await http.get(admin)
        result = {"status": status, "state_status": state.status_code,
                  "rss_bytes": state.json()["process"]["rss_bytes"],
                  "loaded": [name for name in LAZY if name in sys.modules]}
        nursery.cancel_scope.cancel()
    return result


if __name__ == "__main__":
    import_httpcore_without_h2()  # as `meshd run` does first
    print(json.dumps(trio.run(main, Path(sys.argv[1]))))
