"""Real grpcio servers and clients for tests (``pyproject.toml`` puts ``tests/`` on ``sys.path``:
``from grpc_testing import GreeterApp``).

- ``helloworld()``: the gRPC example's runtime-built helloworld module
  (``examples/grpc/helloworld.py``);
- ``generated_stubs(directory)``: ``helloworld_pb2`` and ``helloworld_pb2_grpc`` generated from
  ``examples/grpc/helloworld.proto`` by grpcio-tools, the stock stubs any grpcio user has;
- ``GreeterApp``: a grpcio server on 127.0.0.1, port 0, with ``helloworld.Greeter/SayHello``
  (answering ``Hello NAME, from greeter VERSION on NODE``, or failing or stalling on demand) and
  ``meshtest.Bulk`` (``Download``: server streaming; ``Echo``: bidirectional; raw bytes).

grpcio is synchronous: trio tests call it through ``trio.to_thread.run_sync``. Each server has
its own thread pool and is stopped by the test (``with GreeterApp(...) as app``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import grpc

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "grpc"
BULK = "meshtest.Bulk"
DOWNLOAD = f"/{BULK}/Download"
ECHO = f"/{BULK}/Echo"

_stubs_lock = threading.Lock()


def helloworld() -> Any:
    """examples/grpc/helloworld.py, imported once as ``example_helloworld``."""
    name = "example_helloworld"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE / "helloworld.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def generated_stubs(directory: Path) -> tuple[ModuleType, ModuleType]:
    """``helloworld_pb2`` and ``helloworld_pb2_grpc`` as grpcio-tools generates them from the
    example's .proto (into ``directory``, once per process: protobuf's default pool takes a
    file once)."""
    with _stubs_lock:
        if "helloworld_pb2_grpc" not in sys.modules:
            from grpc_tools import protoc

            directory.mkdir(parents=True, exist_ok=True)
            code = protoc.main(["protoc", f"-I{EXAMPLE}", f"--python_out={directory}",
                                f"--grpc_python_out={directory}",
                                str(EXAMPLE / "helloworld.proto")])
            assert code == 0, f"protoc failed ({code})"
            sys.path.insert(0, str(directory))
            try:
                importlib.import_module("helloworld_pb2")
                importlib.import_module("helloworld_pb2_grpc")
            finally:
                sys.path.remove(str(directory))
        return sys.modules["helloworld_pb2"], sys.modules["helloworld_pb2_grpc"]


def greeting(name: str, version: str, node: str) -> str:
    """What a greeter answers (the example's greeter.py says the same)."""
    return f"Hello {name or 'stranger'}, from greeter {version} on {node}"


def version_of(message: str) -> str:
    """The version named in a greeting."""
    return message.split("from greeter ", 1)[1].split(" ", 1)[0]


class GreeterApp:
    """A grpcio server with the Greeter and the Bulk service; knobs for misbehaving:
    ``fail`` (a status code every SayHello is answered with), ``delay`` (seconds SayHello
    stalls, given up early when the call is cancelled)."""

    def __init__(self, version: str, node: str, workers: int = 16) -> None:
        self.version = version
        self.node = node
        self.fail: grpc.StatusCode | None = None
        self.delay = 0.0
        self.calls = 0
        self.cancelled = threading.Event()  # set when a delayed call saw its cancellation
        self.timeouts: list[float | None] = []  # time_remaining() of each call as it arrived
        self._lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=workers),
                                  options=[("grpc.so_reuseport", 0)])
        hw = helloworld()
        hw.add_greeter(self.server, self._say_hello)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(BULK, {
            "Download": grpc.unary_stream_rpc_method_handler(self._download),
            "Echo": grpc.stream_stream_rpc_method_handler(self._echo),
        }),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        assert self.port, "grpc server could not bind"

    def __enter__(self) -> GreeterApp:
        self.server.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.stop(grace=None).wait(5)

    def _say_hello(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.calls += 1
            self.timeouts.append(context.time_remaining())
        if self.delay:
            until = time.monotonic() + self.delay
            while time.monotonic() < until:
                if not context.is_active():
                    self.cancelled.set()
                    context.abort(grpc.StatusCode.CANCELLED, "cancelled")
                time.sleep(0.01)
        if self.fail is not None:
            context.abort(self.fail, f"greeter {self.version} on {self.node} fails")
        return helloworld().HelloReply(message=greeting(request.name, self.version, self.node))

    @staticmethod
    def _download(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """``b"TOTAL,CHUNK"``: TOTAL bytes in messages of CHUNK bytes."""
        total, chunk = (int(x) for x in request.split(b","))
        block = bytes(range(256)) * (chunk // 256 + 1)
        sent = 0
        while sent < total:
            size = min(chunk, total - sent)
            yield block[:size]
            sent += size

    @staticmethod
    def _echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests


def _read(messages: Iterator[bytes], pause: float) -> int:
    received = 0
    for message in messages:
        received += len(message)
        if pause:
            time.sleep(pause)
    return received


def download(channel: grpc.Channel, total: int, chunk: int, timeout: float = 60,
             pause: float = 0.0) -> int:
    """Bytes received by a server-streaming ``Download`` of ``total`` bytes (``pause``: seconds
    the reader waits after each message, a reader slower than the writer)."""
    call = channel.unary_stream(DOWNLOAD)
    return _read(call(b"%d,%d" % (total, chunk), timeout=timeout), pause)


def echo(channel: grpc.Channel, total: int, chunk: int, timeout: float = 60,
         pause: float = 0.0) -> int:
    """Bytes echoed back by a bidirectional ``Echo`` sent ``total`` bytes in ``chunk``s, as
    fast as they go (``pause``: as ``download``'s, for the echoes)."""
    block = bytes(range(256)) * (chunk // 256 + 1)

    def send() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            size = min(chunk, total - sent)
            yield block[:size]
            sent += size

    call = channel.stream_stream(ECHO)
    return _read(call(send(), timeout=timeout), pause)
