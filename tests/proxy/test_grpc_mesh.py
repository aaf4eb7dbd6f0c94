"""gRPC through two meshds over mTLS, per call: real grpcio clients and servers on loopback.

    grpcio client ──h2c, ONE channel──> meshd a (outbound, greeter: grpc) ══h2 over mTLS══>
        meshd b1 ─h2c─> greeter v1 (grpcio)     meshd b2 ─h2c─> greeter v1     meshd c ─> v2

Each call is routed, split, retried and balanced on its own, although every call of a test
shares one channel (one HTTP/2 connection to meshd a). What a test shows:

- 1000 unary calls follow a 90/10 split (within 4 sigma), counted by the version in the reply;
- an instance answering UNAVAILABLE is retried (``retry_on = ["unavailable"]``) and ejected
  by outlier detection (endpoint state and ``meshd_outlier_ejections_total``);
- a client deadline shorter than the app's delay gives DEADLINE_EXCEEDED on time, and the
  app sees the deadline (``grpc-timeout``) and the cancellation; a route timeout caps a longer
  client deadline: DEADLINE_EXCEEDED from meshd (``x-meshd-error: timeout``);
- an authorization deny reaches the client as PERMISSION_DENIED, the app never called;
- HTTP/1.1 (httpx) works on the same outbound port, between gRPC calls;
- a server-streaming and a bidirectional call pass 10 MB each to a reader slower than the
  writer with bounded memory: the peak of Python allocations (tracemalloc, the three meshds
  run in this process; grpcio's C core is not traced, the Python objects of both grpcio ends
  are) while the stream runs.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import grpc
import httpx
import pytest
import trio
from grpc_testing import GreeterApp, download, echo, helloworld, version_of
from proxy_mesh_testing import Host, make_host
from proxy_testing import MiniCA

from meshd.config.routes import parse_routes
from meshd.config.schema import LocalService, Protocol, Upstream
from meshd.metrics import Metrics
from meshd.proxy.core.view import MeshView, ViewCell
from meshd.registry.model import Endpoint, EndpointSet

T = TypeVar("T")
CALLS = 1000
# 4 sigma of Binomial(1000, 0.1): 100 +- 4 * sqrt(1000 * 0.1 * 0.9) = 100 +- 37.9
V2_RANGE = range(63, 138)
TEN_MB = 10 * 1024 * 1024
CHUNK = 64 * 1024
# what a 10 MB stream may add to the Python heap at its peak: a few flow-control windows and
# frames in flight, not the stream
MEMORY_BOUND = 4 * 1024 * 1024
SLOW_READER = 0.003  # seconds after each 64 KiB message: about 20 MB/s at most
# no proxy from the environment for loopback channels
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


@dataclass
class GrpcMesh:
    """host a: client ──> greeter (grpc); greeter v1 on hosts b1, b2, v2 on host c."""

    a: Host
    hosts: dict[str, Host]
    apps: dict[str, GreeterApp]
    view: ViewCell

    @property
    def target(self) -> str:
        host, port = self.a.proxy.outbound_address("client", "greeter")
        return f"{host}:{port}"

    def endpoint(self, name: str) -> Endpoint:
        return Endpoint("greeter", f"greeter-{name}", name, "127.0.0.1", self.hosts[name].port,
                        self.apps[name].version)

    def set_endpoints(self, *names: str) -> None:
        self.view.set_endpoints(EndpointSet(
            "greeter", tuple(self.endpoint(n) for n in names), 1, 0.0))

    def set_routes(self, greeter: Mapping[str, object], default_policy: str = "allow") -> None:
        """``greeter``'s entry in routes.toml form, in force on every host (as the registry
        puts it): host a routes by it, greeter's meshds authorize by it."""
        entry = {"subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}}, **greeter}
        table = parse_routes({"default_policy": default_policy,
                              "destinations": {"greeter": entry}})
        for view in (self.view, *(h.proxy.view for h in self.hosts.values())):
            view.set_routes(table)

    def state(self, name: str) -> dict[str, object]:
        rows = self.a.proxy.endpoint_states()["greeter"]
        return next(r for r in rows if r["node"] == name)


@pytest.fixture
async def grpc_mesh(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[GrpcMesh]:
    ca = MiniCA.create()
    apps = {"b1": GreeterApp("v1", "b1"), "b2": GreeterApp("v1", "b2"),
            "c": GreeterApp("v2", "c")}
    try:
        for app in apps.values():
            app.server.start()
        hosts = {name: make_host(ca, tmp_path, name, [LocalService(
            "greeter", app.port, protocol=Protocol.GRPC, version=app.version)])
            for name, app in apps.items()}
        view = ViewCell(MeshView(routes=parse_routes({"default_policy": "allow"}),
                                 endpoints=MappingProxyType({})))
        a = make_host(ca, tmp_path, "a", [LocalService("client", 1, upstreams=(
            Upstream("greeter", 0, Protocol.GRPC),))], view)
        for host in (*hosts.values(), a):
            await nursery.start(host.proxy.run)
        mesh = GrpcMesh(a, hosts, apps, view)
        mesh.set_endpoints("b1", "c")
        mesh.set_routes({"split": {"v1": 90, "v2": 10}})
        yield mesh
    finally:
        for app in apps.values():
            app.server.stop(grace=None).wait(5)


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


def say_hello(channel: grpc.Channel, name: str = "mesh", timeout: float = 10) -> Any:
    hw = helloworld()
    return hw.say_hello_stub(channel)(hw.HelloRequest(name=name), timeout=timeout)


def rpc_error(channel: grpc.Channel, timeout: float) -> tuple[grpc.RpcError, float]:
    """The error a SayHello ends in, and how long it took."""
    started = time.monotonic()
    try:
        reply = say_hello(channel, timeout=timeout)
    except grpc.RpcError as exc:
        return exc, time.monotonic() - started
    raise AssertionError(f"the call succeeded: {reply.message!r}")


def metadata(error: grpc.RpcError) -> dict[str, str]:
    found = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    return {k: v for k, v in found if isinstance(v, str)}


def total(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that have ``labels`` (any other labels)."""
    found = 0.0
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                found += s.value
    return found


# -- per-call balancing ----------------------------------------------------------------------


async def test_one_channel_follows_a_90_10_split_per_call(grpc_mesh: GrpcMesh) -> None:
    def run() -> tuple[Counter[str], set[str]]:
        versions: Counter[str] = Counter()
        nodes: set[str] = set()
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(grpc_mesh.target, CHANNEL_OPTIONS) as channel:
            for i in range(CALLS):
                assert time.monotonic() < deadline, f"only {i} calls in 60 s"
                message = say_hello(channel, f"call-{i}").message
                assert message.startswith(f"Hello call-{i}, from greeter "), message
                versions[version_of(message)] += 1
                nodes.add(message.rsplit(" ", 1)[1])
        return versions, nodes

    started = time.monotonic()
    versions, nodes = await in_thread(run)
    print(f"{CALLS} calls on one channel in {time.monotonic() - started:.1f}s: {dict(versions)}")
    assert sum(versions.values()) == CALLS and set(versions) == {"v1", "v2"}
    assert versions["v2"] in V2_RANGE, f"v2 took {versions['v2']} of {CALLS} calls, not ~10%"
    assert nodes == {"b1", "c"}
    assert grpc_mesh.apps["b1"].calls + grpc_mesh.apps["c"].calls == CALLS


# -- retries and outlier ejection ------------------------------------------------------------


async def test_unavailable_is_retried_and_the_instance_ejected(grpc_mesh: GrpcMesh) -> None:
    bad, good = grpc_mesh.apps["b1"], grpc_mesh.apps["b2"]
    bad.fail = grpc.StatusCode.UNAVAILABLE
    grpc_mesh.set_endpoints("b1", "b2")
    grpc_mesh.set_routes({
        "split": {"v1": 100},
        "retries": {"attempts": 1, "retry_on": ["unavailable"]},
        "policy": {"load_balancer": "round_robin",
                   "outlier_detection": {"consecutive_5xx": 3, "base_ejection_time": "30s",
                                         "max_ejection_percent": 50}}})

    def run() -> list[str]:
        with grpc.insecure_channel(grpc_mesh.target, CHANNEL_OPTIONS) as channel:
            return [say_hello(channel, f"call-{i}").message for i in range(20)]

    messages = await in_thread(run)  # every call answered: none raised
    assert all(m.endswith("from greeter v1 on b2") for m in messages), messages
    assert good.calls == 20
    # b1 failed each call it got, each was retried on b2; after 3 in a row it was ejected
    assert 1 <= bad.calls <= 3, bad.calls
    state = grpc_mesh.state("b1")
    assert state["ejected"] is True, state
    assert total(grpc_mesh.a.metrics, "meshd_outlier_ejections_total",
                 destination="greeter") == 1
    assert total(grpc_mesh.a.metrics, "meshd_retries_total", destination="greeter") == bad.calls


async def test_unavailable_reaches_the_client_without_a_retry_policy(
        grpc_mesh: GrpcMesh) -> None:
    bad = grpc_mesh.apps["b1"]
    bad.fail = grpc.StatusCode.UNAVAILABLE
    grpc_mesh.set_endpoints("b1")
    grpc_mesh.set_routes({"split": {"v1": 100}})

    def run() -> tuple[grpc.RpcError, float]:
        with grpc.insecure_channel(grpc_mesh.target, CHANNEL_OPTIONS) as channel:
            return rpc_error(channel, 10)

    error, _ = await in_thread(run)
    assert error.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert error.details() == "greeter v1 on b1 fails"  # type: ignore[attr-defined]
    assert bad.calls == 1


# -- deadlines -------------------------------------------------------------------------------


async def test_a_client_deadline_shorter_than_the_app_gives_deadline_exceeded_on_time(
        grpc_mesh: GrpcMesh) -> None:
    slow = grpc_mesh.apps["b1"]
    grpc_mesh.set_endpoints("b1")
    grpc_mesh.set_routes({"split": {"v1": 100}})

    def run() -> tuple[grpc.RpcError, float]:
        with grpc.insecure_channel(grpc_mesh.target, CHANNEL_OPTIONS) as channel:
            say_hello(channel)  # the connections are up: what follows times the call only
            slow.delay = 3.0
            return rpc_error(channel, 0.3)

    error, took = await in_thread(run)
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert 0.3 <= took < 0.3 + 0.5, took
    # the deadline went along (grpc-timeout) and the app's call was cancelled with the client's
    remaining = slow.timeouts[-1]
    assert remaining is not None and 0 < remaining <= 0.3 + 0.02, slow.timeouts  # rounding
    assert await in_thread(lambda: slow.cancelled.wait(3)), "the app's call was not cancelled"


async def test_the_route_timeout_caps_a_longer_client_deadline(grpc_mesh: GrpcMesh) -> None:
    slow = grpc_mesh.apps["b1"]
    slow.delay = 3.0
    grpc_mesh.set_endpoints("b1")
    grpc_mesh.set_routes({"split": {"v1": 100}, "timeout": "300ms"})

    def run() -> tuple[grpc.RpcError, float]:
        with grpc.insecure_channel(grpc_mesh.target, CHANNEL_OPTIONS) as channel:
            return rpc_error(channel, 10)

    error, took = await in_thread(run)
    # meshd's answer, a gRPC error the client reads, long before the client's own 10 s
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED, error  # type: ignore[attr-defined]
    assert took < 0.3 + 1.0, took
    assert metadata(error).get("x-meshd-error") == "timeout", metadata(error)
    # the app was told the capped deadline, not the client's 10 s
    remaining = slow.timeouts[-1]
    assert remaining is not None and 0 < remaining <= 0.3 + 0.02, slow.timeouts  # rounding


# -- authorization ---------------------------------------------------------------------------


async def test_an_authorization_deny_is_permission_denied(grpc_mesh: GrpcMesh) -> None:
    grpc_mesh.set_endpoints("b1")
    grpc_mesh.set_routes({"split": {"v1": 100}, "authorization": {"rules": [
        {"name": "only-web", "action": "allow", "from": ["web"]}]}}, default_policy="deny")

    def run() -> tuple[grpc.RpcError, float]:
        with grpc.insecure_channel(grpc_mesh.target, CHANNEL_OPTIONS) as channel:
            return rpc_error(channel, 10)

    error, _ = await in_thread(run)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED, error  # type: ignore[attr-defined]
    assert "denied" in error.details()  # type: ignore[attr-defined]
    assert grpc_mesh.apps["b1"].calls == 0


# -- HTTP/1.1 on the same port ---------------------------------------------------------------


def _frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


async def test_http1_works_on_the_outbound_port_between_grpc_calls(
        grpc_mesh: GrpcMesh) -> None:
    grpc_mesh.set_endpoints("b1")
    grpc_mesh.set_routes({"split": {"v1": 100}})
    hw = helloworld()
    body = _frame(hw.HelloRequest(name="h1").SerializeToString())
    with grpc.insecure_channel(grpc_mesh.target, CHANNEL_OPTIONS) as channel:
        async with httpx.AsyncClient(base_url=f"http://{grpc_mesh.target}", http1=True,
                                     http2=False, trust_env=False, timeout=10) as client:
            for i in range(3):
                reply = await in_thread(lambda i=i: say_hello(channel, f"rpc-{i}"))
                assert reply.message == f"Hello rpc-{i}, from greeter v1 on b1"
                # a gRPC call in HTTP/1.1's clothes: a POST with the framed message
                response = await client.post(
                    "/helloworld.Greeter/SayHello", content=body,
                    headers={"content-type": "application/grpc", "te": "trailers"})
                assert response.http_version == "HTTP/1.1"
                assert response.status_code == 200, (response.headers, response.content)
                flag, size = struct.unpack(">BI", response.content[:5])
                assert flag == 0 and size == len(response.content) - 5
                answer = hw.HelloReply.FromString(response.content[5:])
                assert answer.message == "Hello h1, from greeter v1 on b1"
    assert grpc_mesh.apps["b1"].calls == 6


# -- streaming -------------------------------------------------------------------------------


async def _peak_during(fn: Callable[[], int]) -> tuple[int, int]:
    """What ``fn`` returns, and the peak of traced Python allocations above where they stood
    when it started."""
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = await in_thread(fn)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak - base


@pytest.mark.parametrize("kind", ["server-streaming", "bidirectional"])
async def test_10_mb_stream_passes_with_bounded_memory(grpc_mesh: GrpcMesh, kind: str) -> None:
    grpc_mesh.set_endpoints("b1")
    grpc_mesh.set_routes({"split": {"v1": 100}})
    call = download if kind == "server-streaming" else echo
    with grpc.insecure_channel(grpc_mesh.target, CHANNEL_OPTIONS) as channel:
        assert await in_thread(lambda: call(channel, CHUNK, CHUNK)) == CHUNK  # warmed up
        # a reader slower than the writer: without backpressure the stream piles up in meshd
        received, peak = await _peak_during(
            lambda: call(channel, TEN_MB, CHUNK, pause=SLOW_READER))
    assert received == TEN_MB
    print(f"{kind}: 10 MB through the mesh, Python heap peak +{peak / 1e6:.2f} MB")
    assert peak < MEMORY_BOUND, f"{kind}: the heap grew by {peak / 1e6:.1f} MB for 10 MB"
