"""greeter: the gRPC example's backend, ``helloworld.Greeter/SayHello`` on grpcio.

    SayHello(HelloRequest{name: "mesh"})  ->  HelloReply{message: "Hello mesh, from greeter v1
                                                                on host-b"}

It speaks plaintext HTTP/2 (h2c) on its own address and knows nothing about the mesh: meshd's
inbound listener on its host terminates mTLS and forwards each call to it. It also answers the
standard health protocol (``grpc.health.v1.Health/Check``), which meshd's health check asks.
Needs grpcio and protobuf (``pip install grpcio protobuf``, or meshd's ``grpc-example`` extra).
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

import grpc

# helloworld.py is beside this file: Python puts a script's folder first on sys.path
from health import SERVICE_UNKNOWN, SERVING, add_health
from helloworld import SERVICE, HelloReply, add_greeter


def greeting(name: str, version: str, node: str) -> str:
    return f"Hello {name or 'stranger'}, from greeter {version} on {node}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--version", default="v1")
    parser.add_argument("--node", default=socket.gethostname(), help="host name to report")
    parser.add_argument("--workers", type=int, default=16, help="threads serving calls")
    args = parser.parse_args(argv)

    def say_hello(request: Any, context: grpc.ServicerContext) -> Any:
        return HelloReply(message=greeting(request.name, args.version, args.node))

    # so_reuseport off: a second server on the same port must fail, not share it silently
    server = grpc.server(ThreadPoolExecutor(max_workers=args.workers),
                         options=[("grpc.so_reuseport", 0)])
    add_greeter(server, say_hello)
    # the standard health protocol, for meshd's health = { grpc = "helloworld.Greeter" }
    add_health(server, lambda name: SERVING if name in ("", SERVICE) else SERVICE_UNKNOWN)
    where = f"{args.address}:{args.port}"
    if server.add_insecure_port(where) == 0:
        print(f"greeter: cannot listen on {where}", file=sys.stderr, flush=True)
        return 1
    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    print(f"greeter {args.version} on {args.node}: listening on {where} (h2c)", flush=True)
    stopping.wait()
    server.stop(grace=2).wait()
    print("greeter: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
