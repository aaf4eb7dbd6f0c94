"""HTTP/2 through the in-process mesh: h2c clients on an outbound listener, h2 between meshds
(ALPN), HTTP/1.1 apps behind (translated at the callee's meshd)."""

from __future__ import annotations

import json
import subprocess

import trio
from proxy_mesh_testing import Mesh


async def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(["curl", "-sS", "--max-time", "10", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)


async def test_h2c_prior_knowledge_reaches_an_http1_app_over_h2_between_meshds(
        mesh: Mesh) -> None:
    done = await _curl("--http2-prior-knowledge", "-w", "\n%{http_version}",
                       f"{mesh.url()}/version")
    assert done.returncode == 0, done.stderr
    body, version = done.stdout.rsplit(b"\n", 1)
    print(done.stdout, done.stderr)
    assert version == b"2"
    seen = json.loads(body)
    assert seen["headers"]["x-meshd-source"] == "web"


# -- gRPC ---------------------------------------------------------------------------------------

from collections.abc import Iterator  # noqa: E402
from concurrent import futures  # noqa: E402
from pathlib import Path  # noqa: E402
from types import MappingProxyType  # noqa: E402

import grpc  # noqa: E402
import pytest  # noqa: E402
from proxy_mesh_testing import OPEN, Host, make_host  # noqa: E402
from proxy_testing import MiniCA  # noqa: E402

from meshd.config.routes import parse_routes  # noqa: E402
from meshd.config.schema import LocalService, Protocol, Upstream  # noqa: E402
from meshd.proxy.core.view import MeshView, ViewCell  # noqa: E402
from meshd.registry.model import Endpoint, EndpointSet  # noqa: E402

_RAW = {"request_deserializer": None, "response_serializer": None}


class Greeter:
    """A grpcio server answering ``/test.Greeter/SayHello`` (raw bytes: the reply names its
    version), and ``/test.Greeter/Stream`` (server streaming)."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "SayHello": grpc.unary_unary_rpc_method_handler(self.hello),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Greeter", handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.fail_with: grpc.StatusCode | None = None

    def hello(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if self.fail_with is not None:
            context.abort(self.fail_with, f"{self.version} refuses")
        return b"hello " + request + b" from " + self.version.encode()

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        count, size = (int(x) for x in request.split(b","))
        for _ in range(count):
            yield os.urandom(size)


import os  # noqa: E402


@pytest.fixture
async def grpc_mesh(tmp_path: Path, nursery: trio.Nursery) -> tuple[Host, ViewCell, list[Greeter]]:
    ca = MiniCA.create()
    greeters = [Greeter("v1"), Greeter("v2")]
    for g in greeters:
        g.server.start()
    hosts = [make_host(ca, tmp_path, f"g{i}", [LocalService(
        "greeter", g.port, protocol=Protocol.GRPC, version=g.version)])
        for i, g in enumerate(greeters)]
    view = ViewCell(MeshView(routes=OPEN, endpoints=MappingProxyType({})))
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
