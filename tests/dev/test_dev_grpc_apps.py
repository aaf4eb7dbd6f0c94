"""The gRPC example's apps on their own (no mesh): the greeter answers stubs generated from
helloworld.proto by grpcio-tools (what any grpcio user has) and the standard health protocol,
the example's client calls a server built from those stubs, and both stop cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_testing import EXAMPLE, generated_stubs, helloworld
from net_testing import free_port
from test_dev_shop_apps import wait_listening

from meshd.config.schema import HealthCheck, LocalService, Protocol
from meshd.daemon.health import probe
from meshd.registry.model import CRITICAL, PASSING


def start(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(EXAMPLE / script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """SIGTERM, then its exit code and output (killed if it lingers)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out.decode(errors="replace")


@pytest.fixture
def greeter() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = start("greeter.py", "--port", str(port), "--version", "v2", "--node", "host-c")
    try:
        wait_listening("127.0.0.1", port, proc)
        yield port, proc
    finally:
        stop(proc)


def test_greeter_answers_stock_generated_stubs(
        greeter: tuple[int, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    port, proc = greeter
    pb2, pb2_grpc = generated_stubs(tmp_path / "stubs")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb2_grpc.GreeterStub(channel)
        reply = stub.SayHello(pb2.HelloRequest(name="mesh"), timeout=10)
        assert reply.message == "Hello mesh, from greeter v2 on host-c"
        # the runtime-built classes and the generated ones agree on the wire, both ways
        hw = helloworld()
        assert (hw.HelloRequest(name="x \u00e9").SerializeToString()
                == pb2.HelloRequest(name="x \u00e9").SerializeToString())
        own = hw.say_hello_stub(channel)(hw.HelloRequest(name=""), timeout=10)
        assert own.message == "Hello stranger, from greeter v2 on host-c"
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/helloworld.Greeter/SayGoodbye")(b"", timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
        # the standard health protocol, in its wire format: HealthCheckRequest{service = 1},
        # HealthCheckResponse{status = 1}: SERVING is 1
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        for service in (b"", b"helloworld.Greeter"):
            assert check(b"\n" + bytes([len(service)]) + service, timeout=10) == b"\x08\x01"
        with pytest.raises(grpc.RpcError) as caught:
            check(b"\n\x05other", timeout=10)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    code, out = stop(proc)
    assert code == 0 and "greeter v2 on host-c: listening on" in out and "stopped" in out


def test_client_counts_versions_on_one_channel_against_a_generated_server(
        tmp_path: Path) -> None:
    pb2, pb2_grpc = generated_stubs(tmp_path / "stubs")
    peers: set[str] = set()

    class Greeter(pb2_grpc.GreeterServicer):  # type: ignore[name-defined]
        def SayHello(self, request: Any, context: grpc.ServicerContext) -> Any:
            peers.add(context.peer())  # "ipv4:127.0.0.1:PORT": the client's connection
            return pb2.HelloReply(message=f"Hello {request.name}, from greeter v7 on host-z")

    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        proc = start("client.py", "--target", f"127.0.0.1:{port}", "--calls", "12",
                     "--every", "4", "--interval", "0")
        out, _ = proc.communicate(timeout=30)
    finally:
        server.stop(grace=None).wait(5)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "client: 4 calls: v7 4" in text and "client: 12 calls: v7 12" in text, text
    assert len(peers) == 1, peers  # one channel: every call on one connection


async def test_greeter_passes_meshds_grpc_health_check(
        greeter: tuple[int, subprocess.Popen[bytes]]) -> None:
    # what the example's mesh.toml declares: health = { grpc = "helloworld.Greeter" }
    port, _ = greeter
    async with httpx.AsyncClient() as http:
        for name, expected in (("helloworld.Greeter", PASSING), ("", PASSING),
                               ("nobody.Else", CRITICAL)):
            service = LocalService("greeter", port, protocol=Protocol.GRPC,
                                   health=HealthCheck("grpc", name, 1.0, 5.0))
            result = await probe(service, http)
            assert result.status == expected, (name, result)
