"""HTTP/2 through the in-process mesh: h2c clients on an outbound listener, h2 between meshds
(ALPN), apps speaking HTTP/1.1 (translated at the callee's meshd) or h2c (an ``H2App`` of
the ``h2`` library, and real grpcio servers), gRPC statuses for what meshd answers itself."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
from proxy_mesh_testing import OPEN, Farm, Host, Mesh, make_host
from proxy_testing import MiniCA, eventually, sample

from meshd.config.routes import parse_routes
from meshd.config.schema import HealthCheck, LocalService, Protocol, Upstream
from meshd.daemon.health import probe, probe_client
from meshd.proxy.core.view import MeshView, ViewCell
from meshd.registry.model import CRITICAL, PASSING, Endpoint, EndpointSet


async def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(["curl", "-sS", "--max-time", "10", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)


async def test_h2c_prior_knowledge_reaches_an_http1_app_over_h2_between_meshds(
        mesh: Mesh) -> None:
    done = await _curl("--http2-prior-knowledge", "-w", "\n%{http_version}",
                       f"{mesh.url()}/version")
    assert done.returncode == 0, done.stderr
    body, version = done.stdout.rsplit(b"\n", 1)
    assert version == b"2"
    seen = json.loads(body)
    assert seen["headers"]["x-meshd-source"] == "web"


# -- gRPC ---------------------------------------------------------------------------------------


class Greeter:
    """A grpcio server answering ``/test.Greeter/SayHello`` (raw bytes: the reply names its
    version), and ``/test.Greeter/Stream`` (server streaming)."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "SayHello": grpc.unary_unary_rpc_method_handler(self.hello),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            "Slow": grpc.unary_stream_rpc_method_handler(self.slow),
        }
        health = {"Check": grpc.unary_unary_rpc_method_handler(self.check)}
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Greeter", handlers),
             grpc.method_handlers_generic_handler("grpc.health.v1.Health", health)))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.fail_with: grpc.StatusCode | None = None
        self.serving = True

    def check(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request not in (b"", b"\x0a\x07greeter"):
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return b"\x08\x01" if self.serving else b"\x08\x02"  # SERVING / NOT_SERVING

    def hello(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if self.fail_with is not None:
            context.abort(self.fail_with, f"{self.version} refuses")
        return b"hello " + request + b" from " + self.version.encode()

    def slow(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            time.sleep(0.1)
            yield b"%d" % i

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        count, size = (int(x) for x in request.split(b","))
        for _ in range(count):
            yield os.urandom(size)


@pytest.fixture
async def grpc_mesh(tmp_path: Path, nursery: trio.Nursery) -> tuple[Host, ViewCell, list[Greeter]]:
    ca = MiniCA.create()
    greeters = [Greeter("v1"), Greeter("v2")]
    for g in greeters:
        g.server.start()
    view = ViewCell(MeshView(routes=OPEN, endpoints=MappingProxyType({})))  # every host's
    hosts = [make_host(ca, tmp_path, f"g{i}", [LocalService(
        "greeter", g.port, protocol=Protocol.GRPC, version=g.version)], view)
        for i, g in enumerate(greeters)]
    a = make_host(ca, tmp_path, "a", [LocalService("client", 1, upstreams=(
        Upstream("greeter", 0, Protocol.GRPC),))], view)
    for host in (*hosts, a):
        await nursery.start(host.proxy.run)
    view.set_endpoints(EndpointSet("greeter", tuple(
        Endpoint("greeter", f"greeter-{g.version}", f"g{i}", "127.0.0.1", h.port, g.version)
        for i, (g, h) in enumerate(zip(greeters, hosts, strict=True))), 1, 0.0))
    view.set_routes(parse_routes({"default_policy": "allow", "destinations": {"greeter": {
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "split": {"v1": 50, "v2": 50}}}}))
    try:
        yield a, view, greeters
    finally:
        for g in greeters:
            g.server.stop(0)


async def test_grpc_unary_calls_on_one_channel_are_balanced_per_call(grpc_mesh) -> None:
    a, _, _ = grpc_mesh
    host, port = a.proxy.outbound_address("client", "greeter")

    def calls() -> list[bytes]:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            hello = channel.unary_unary("/test.Greeter/SayHello")
            return [hello(b"x", timeout=5) for _ in range(40)]

    replies = await trio.to_thread.run_sync(calls)
    assert {r.rsplit(b" ", 1)[1] for r in replies} == {b"v1", b"v2"}


async def test_grpc_server_streaming_passes_10_mb(grpc_mesh) -> None:
    a, _, _ = grpc_mesh
    host, port = a.proxy.outbound_address("client", "greeter")

    def stream() -> int:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            call = channel.unary_stream("/test.Greeter/Stream")
            return sum(len(m) for m in call(b"160,65536", timeout=8))

    assert await trio.to_thread.run_sync(stream) == 160 * 65536


async def test_grpc_errors_and_deadlines_reach_the_client_as_grpc_statuses(grpc_mesh) -> None:
    a, view, greeters = grpc_mesh
    host, port = a.proxy.outbound_address("client", "greeter")
    for g in greeters:
        g.fail_with = grpc.StatusCode.FAILED_PRECONDITION

    def call() -> grpc.StatusCode:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            try:
                channel.unary_unary("/test.Greeter/SayHello")(b"x", timeout=5)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    assert await trio.to_thread.run_sync(call) == grpc.StatusCode.FAILED_PRECONDITION
    view.set_endpoints(EndpointSet("greeter", (), 2, 0.0))
    assert await trio.to_thread.run_sync(call) == grpc.StatusCode.UNAVAILABLE
    # counted with the gRPC status: the app's (9) and meshd's own answer (14, no endpoint)
    assert sample(a.metrics, "meshd_requests_total", direction="outbound", source="client",
                  destination="greeter", code="200", grpc_status="9") == 1
    assert sample(a.metrics, "meshd_requests_total", direction="outbound", source="client",
                  destination="greeter", code="503", grpc_status="14") == 1


# -- an h2c app, and HTTP versions translated at the callee's meshd ------------------------------


class H2App:
    """A small h2c server (the ``h2`` library): every request is answered 200 with a JSON body
    naming its method, path, headers and the length of the body it read."""

    def __init__(self) -> None:
        self.port = 0
        self.requests = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        seen: dict[int, dict[str, Any]] = {}
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    headers = {k.decode() if isinstance(k, bytes) else k:
                               v.decode() if isinstance(v, bytes) else v
                               for k, v in event.headers}
                    seen[event.stream_id] = {"headers": headers, "length": 0}
                elif isinstance(event, h2.events.DataReceived):
                    seen[event.stream_id]["length"] += len(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length,
                                                   event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self.requests += 1
                    body = json.dumps(seen.pop(event.stream_id)).encode()
                    conn.send_headers(event.stream_id, [
                        (":status", "200"), ("content-type", "application/json"),
                        ("content-length", str(len(body)))])
                    conn.send_data(event.stream_id, body, end_stream=True)
            await stream.send_all(conn.data_to_send())


@pytest.fixture
async def h2_mesh(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[tuple[Host, H2App]]:
    """host a: web -> api (http); host b: api, an h2c app (``protocol = "http2"``)."""
    ca = MiniCA.create()
    app = H2App()
    await nursery.start(app.serve)
    b = make_host(ca, tmp_path, "b", [LocalService("api", app.port, protocol=Protocol.HTTP2)])
    view = ViewCell(MeshView(routes=OPEN, endpoints=MappingProxyType({})))
    a = make_host(ca, tmp_path, "a", [LocalService("web", 1, upstreams=(Upstream("api", 0),))],
                  view)
    for host in (b, a):
        await nursery.start(host.proxy.run)
    view.set_endpoints(EndpointSet("api", (
        Endpoint("api", "api-1", "b", "127.0.0.1", b.port, "v1"),), 1, 0.0))
    yield a, app


async def test_http1_and_h2c_clients_share_a_port_and_reach_an_h2c_app(h2_mesh) -> None:
    a, app = h2_mesh
    host, port = a.proxy.outbound_address("web", "api")
    url = f"http://{host}:{port}/things?x=1"
    # HTTP/1.1 caller: HTTP/1.1 between the meshds, h2c from b's meshd to the app
    async with httpx.AsyncClient() as client:
        response = await client.post(url, content=b"z" * 100_000)
    assert response.status_code == 200
    seen = response.json()
    assert seen["length"] == 100_000
    assert seen["headers"][":method"] == "POST"
    assert seen["headers"][":path"] == "/things?x=1"
    assert seen["headers"]["x-meshd-source"] == "web"
    # h2c caller on the same port: HTTP/2 all the way
    done = await _curl("--http2-prior-knowledge", "-w", "\n%{http_version}", "--data-binary",
                       "@-", url)
    assert done.returncode == 0, done.stderr
    body, version = done.stdout.rsplit(b"\n", 1)
    assert version == b"2"
    assert json.loads(body)["headers"][":authority"] == f"{host}:{port}"
    assert app.requests == 2


async def test_grpc_call_denied_by_authorization_gets_permission_denied(grpc_mesh) -> None:
    a, view, _ = grpc_mesh
    view.set_routes(parse_routes({"default_policy": "allow", "destinations": {"greeter": {
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "split": {"v1": 50, "v2": 50},
        "authorization": {"rules": [{"name": "nobody", "action": "deny", "from": ["*"]}]}}}}))
    host, port = a.proxy.outbound_address("client", "greeter")

    def call() -> tuple[grpc.StatusCode, str]:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            try:
                channel.unary_unary("/test.Greeter/SayHello")(b"x", timeout=5)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
            return grpc.StatusCode.OK, ""

    code, details = await trio.to_thread.run_sync(call)
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert "denied" in details


# -- health checks of apps that speak HTTP/2 ------------------------------------------------------


async def test_grpc_and_h2c_health_checks(nursery: trio.Nursery) -> None:
    greeter = Greeter("v1")
    greeter.server.start()
    app = H2App()
    await nursery.start(app.serve)
    try:
        async with probe_client() as http:
            for name, expected in (("", PASSING), ("greeter", PASSING), ("nope", CRITICAL)):
                svc = LocalService("greeter", greeter.port, protocol=Protocol.GRPC,
                                   health=HealthCheck("grpc", name, 1.0, 2.0))
                result = await probe(svc, http)
                assert result.status == expected, result.output
            greeter.serving = False
            result = await probe(svc_named(greeter.port, ""), http)
            assert (result.status, result.output.endswith("not SERVING")) == (CRITICAL, True)
            h2_app = LocalService("api", app.port, protocol=Protocol.HTTP2,
                                  health=HealthCheck("http", "/healthz", 1.0, 2.0))
            result = await probe(h2_app, http)
            assert result.status == PASSING, result.output
            assert "HTTP/2 GET" in result.output
    finally:
        greeter.server.stop(0)


def svc_named(port: int, name: str) -> LocalService:
    return LocalService("greeter", port, protocol=Protocol.GRPC,
                        health=HealthCheck("grpc", name, 1.0, 2.0))


async def test_a_drain_lets_grpc_streams_in_flight_finish(grpc_mesh) -> None:
    a, _, _ = grpc_mesh
    host, port = a.proxy.outbound_address("client", "greeter")
    started = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def stream() -> list[bytes]:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            got = []
            for message in channel.unary_stream("/test.Greeter/Slow")(b"10", timeout=10):
                got.append(message)
                if len(got) == 1:
                    trio.from_thread.run_sync(started.set, trio_token=token)
            return got

    async with trio.open_nursery() as nursery:
        result: list[list[bytes]] = []

        async def run() -> None:
            result.append(await trio.to_thread.run_sync(stream))

        nursery.start_soon(run)
        await started.wait()
        await a.proxy.drain(trio.current_time() + 10)
    assert result == [[b"%d" % i for i in range(10)]]


async def test_h2_requests_are_mirrored_and_split_like_http1(farm: Farm, tmp_path: Path) -> None:
    farm.set_routes({"split": {"v1": 100}, "mirror": {"subset": "v2", "percent": 100}})
    body = tmp_path / "body"
    body.write_bytes(os.urandom(10_000))
    done = await _curl("--http2-prior-knowledge", "--data-binary", f"@{body}",
                       f"{farm.url()}/sha")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == "v1"
    await eventually(lambda: bool(farm.apps["b3"].seen))
    copy = farm.apps["b3"].seen[0]
    assert copy["headers"]["x-meshd-mirror"] == "1"
    assert copy["size"] == 10_000 and copy["method"] == "POST"


async def test_route_edge_features_apply_to_h2_requests(farm: Farm) -> None:
    farm.set_routes({"split": {"v1": 100},
                     "response_headers": {"set": {"x-edge": "h2"}},
                     "rate_limit": {"requests_per_second": 0.1, "burst": 1}})
    url = f"{farm.url()}/version"
    first = await _curl("--http2-prior-knowledge", "-i", url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(b"HTTP/2 200") and b"x-edge: h2" in first.stdout
    second = await _curl("--http2-prior-knowledge", "-i", url)
    assert second.stdout.startswith(b"HTTP/2 429")
    assert b"x-meshd-error: rate-limited" in second.stdout
