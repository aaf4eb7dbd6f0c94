"""client: calls ``helloworld.Greeter/SayHello`` in a loop on ONE gRPC channel and prints a
running count of the versions that answered.

    client.py --target 127.0.0.1:9292        # the outbound listener meshd opens for greeter

One channel is one HTTP/2 connection to meshd, carrying every call; meshd routes and balances
each call on its own, so the counts follow the route's split (50/50 in this example), which a
per-connection balancer could not do. Needs grpcio and protobuf.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from collections import Counter
from types import FrameType

import grpc

# helloworld.py is beside this file: Python puts a script's folder first on sys.path
from helloworld import HelloRequest, say_hello_stub

VERSION = re.compile(r"from greeter (\S+) on (\S+)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="127.0.0.1:9292")
    parser.add_argument("--name", default="mesh")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between calls")
    parser.add_argument("--every", type=int, default=10, help="print the counts every N calls")
    parser.add_argument("--calls", type=int, default=0, help="stop after N calls (0: never)")
    parser.add_argument("--deadline", type=float, default=2.0, help="seconds per call")
    args = parser.parse_args(argv)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    calls = 0
    print(f"client: calling {args.target} on one channel", flush=True)
    with grpc.insecure_channel(args.target) as channel:
        say_hello = say_hello_stub(channel)
        try:
            while args.calls == 0 or calls < args.calls:
                calls += 1
                try:
                    reply = say_hello(HelloRequest(name=args.name), timeout=args.deadline,
                                      wait_for_ready=True)
                    found = VERSION.search(reply.message)
                    counts[found.group(1) if found else "?"] += 1
                except grpc.RpcError as exc:
                    code = exc.code().name if exc.code() is not None else "?"
                    if not errors[code]:  # the first of each kind, in full
                        print(f"client: call {calls} failed: {code}: {exc.details()}",
                              flush=True)
                    errors[code] += 1
                if calls % args.every == 0:
                    seen = ", ".join(f"{v} {n}" for v, n in sorted(counts.items()))
                    failed = ", ".join(f"{c} {n}" for c, n in sorted(errors.items()))
                    print(f"client: {calls} calls: {seen or 'no replies'}"
                          + (f" (failed: {failed})" if failed else ""), flush=True)
                time.sleep(args.interval)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
