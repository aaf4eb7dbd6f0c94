"""Registry benchmark: registration rate and blocking-query fan-out latency, over loopback HTTP.

    python bench/registry_bench.py                 # meshd's embedded registry, as a child process
    python bench/registry_bench.py --registry http://127.0.0.1:8500   # any registry on loopback

1. Registration rate: N agent service registrations (PUT /v1/agent/service/register, one TTL
   check each) over keep-alive connections, sequentially and with C concurrent clients; for the
   embedded registry both in memory and with a data directory (every write fsynced).
2. Fan-out latency: N watchers park a blocking query on one key (GET /v1/kv/<key>?index=...),
   one write changes the key, and we time from the write to the last watcher's answer, for
   N = 10, 100, 1000 (several rounds each; every watcher must come back with the new index).

Loopback only; every step is bounded by a timeout; the child registry is stopped and everything
registered is removed at the end.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench/fanout"
STEP_TIMEOUT = 120.0


def _loopback(url: str) -> str:
    host = httpx.URL(url).host
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"registry_bench: {url} is not a loopback address; refusing to load it")
    return url.rstrip("/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def child_registry(data_dir: Path | None) -> Iterator[str]:
    """``meshd registry serve`` as a child process on a free loopback port."""
    port = _free_port()
    cmd = [sys.executable, "-m", "meshd", "--log-level", "warning", "registry", "serve",
           "--http", f"127.0.0.1:{port}"]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise SystemExit(f"registry_bench: the registry did not start: {err}")
            try:
                httpx.get(f"{url}/v1/status/leader", timeout=1, trust_env=False)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("registry_bench: the registry did not start in 15 s") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# --- 1. registration rate --------------------------------------------------------------------


class RawConnection:
    """A minimal keep-alive HTTP/1.1 client on one trio stream: the bench measures the registry,
    not a client library (httpx costs more CPU per request than the registry does)."""

    def __init__(self, stream: trio.SocketStream, token: str) -> None:
        self.stream = stream
        self.extra = f"X-Consul-Token: {token}\r\n" if token else ""
        self.buffer = b""

    @classmethod
    async def open(cls, url: str, token: str) -> RawConnection:
        parsed = httpx.URL(url)
        return cls(await trio.open_tcp_stream(parsed.host, parsed.port or 80), token)

    async def request(self, method: str, target: str, body: bytes = b"") -> int:
        await self.stream.send_all(
            f"{method} {target} HTTP/1.1\r\nHost: bench\r\n{self.extra}"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        while b"\r\n\r\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("registry closed the connection")
            self.buffer += chunk
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("registry closed the connection")
            rest += chunk
        self.buffer = rest[length:]
        return int(head.split(b" ", 2)[1])

    async def aclose(self) -> None:
        await self.stream.aclose()


async def registration_rate(url: str, n: int, concurrency: int, token: str) -> float:
    """Registrations per second for ``n`` services over ``concurrency`` connections."""
    next_id = iter(range(n))
    connections = [await RawConnection.open(url, token) for _ in range(concurrency)]

    async def worker(conn: RawConnection) -> None:
        for i in next_id:
            body = json.dumps({
                "Name": f"bench-{i % 50}", "ID": f"bench-{concurrency}-{i}", "Port": 10000 + i,
                "Tags": ["bench"], "Meta": {"version": "v1"},
                "Check": {"TTL": "60s", "Status": "passing"}}).encode()
            status = await conn.request("PUT", "/v1/agent/service/register", body)
            if status != 200:
                raise SystemExit(f"registry_bench: registration answered {status}")

    try:
        with trio.fail_after(STEP_TIMEOUT):
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for conn in connections:
                    nursery.start_soon(worker, conn)
            elapsed = time.perf_counter() - started
            for i in range(n):  # clean up
                await connections[0].request(
                    "PUT", f"/v1/agent/service/deregister/bench-{concurrency}-{i}")
    finally:
        for conn in connections:
            await conn.aclose()
    return n / elapsed


# --- 2. fan-out latency ----------------------------------------------------------------------


async def fanout_round(url: str, watchers: int, token: str) -> tuple[float, float, int]:
    """(ms to the median watcher, ms to the last watcher, how many came back with the new
    index) for one write observed by ``watchers`` parked blocking queries."""
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    headers = {"X-Consul-Token": token} if token else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30,
                                 trust_env=False) as client:
        await client.put(f"/v1/kv/{KEY}", content=b"before")
        index = int((await client.get(f"/v1/kv/{KEY}")).headers["X-Consul-Index"])
        auth = f"X-Consul-Token: {token}\r\n" if token else ""
        request = (f"GET /v1/kv/{KEY}?index={index}&wait=60s HTTP/1.1\r\nHost: bench\r\n"
                   f"{auth}\r\n").encode()
        done: list[tuple[float, bytes]] = []
        connected = 0
        all_sent = trio.Event()

        async def watch() -> None:
            nonlocal connected
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(request)
                connected += 1
                if connected == watchers:
                    all_sent.set()
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    head += chunk
                done.append((time.perf_counter(), head))

        with trio.fail_after(STEP_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for _ in range(watchers):
                    nursery.start_soon(watch)
                await all_sent.wait()
                await trio.sleep(0.2 + watchers / 2000)  # let the last requests park
                started = time.perf_counter()
                await client.put(f"/v1/kv/{KEY}", content=b"after")
            new_index = int((await client.get(f"/v1/kv/{KEY}")).headers["X-Consul-Index"])
            await client.delete(f"/v1/kv/{KEY}")
    marker = f"X-Consul-Index: {new_index}\r\n".encode()
    fresh = sum(1 for _, head in done if head.startswith(b"HTTP/1.1 200") and marker in head)
    latencies = sorted((t - started) * 1000 for t, _ in done)
    return statistics.median(latencies), latencies[-1], fresh


async def fanout(url: str, watchers: int, rounds: int, token: str) -> tuple[float, float,
                                                                              float, bool]:
    results = [await fanout_round(url, watchers, token) for _ in range(rounds)]
    lasts = [last for _, last, _ in results]
    medians = [median for median, _, _ in results]
    complete = all(fresh == watchers for _, _, fresh in results)
    return statistics.median(medians), statistics.median(lasts), max(lasts), complete


# --- report ----------------------------------------------------------------------------------


async def run_bench(args: argparse.Namespace) -> None:
    token = args.token or os.environ.get("CONSUL_HTTP_TOKEN", "")
    targets: list[tuple[str, Path | None]] = []
    tmp = Path(tempfile.mkdtemp(prefix="registry-bench-"))
    try:
        if args.registry:
            targets.append((_loopback(args.registry), None))
        print(f"registry bench: N={args.n} registrations, fan-out N={args.watchers}, "
              f"{args.rounds} rounds each, loopback HTTP\n")
        print("registration rate")
        print(f"  {'registry':<34} {'clients':>7} {'registrations/s':>16}")
        modes = ([("given", None)] if args.registry else
                 [("embedded, in memory", None), ("embedded, --data-dir (fsync)", tmp / "d")])
        fanout_url = ""
        for label, data_dir in modes:
            with _target(args.registry, data_dir) as url:
                for clients in args.clients:
                    rate = await registration_rate(url, args.n, clients, token)
                    print(f"  {label:<34} {clients:>7} {rate:>16.0f}")
                if data_dir is not None or args.registry:
                    fanout_url = url
                    print("\nblocking-query fan-out: one KV write -> N watchers answered "
                          f"({label})")
                    print(f"  {'N':>5} {'median watcher ms':>18} {'last watcher ms':>16} "
                          f"{'worst round ms':>15} {'all answered':>13}")
                    for n in args.watchers:
                        med, last, worst, ok = await fanout(url, n, args.rounds, token)
                        print(f"  {n:>5} {med:>18.1f} {last:>16.1f} {worst:>15.1f} "
                              f"{'yes' if ok else 'NO':>13}")
        assert fanout_url
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _target(given: str | None, data_dir: Path | None) -> Iterator[str]:
    if given:
        yield _loopback(given)
        return
    with child_registry(data_dir) as url:
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", metavar="URL",
                        help="bench this registry (loopback only) instead of starting one")
    parser.add_argument("--token", default="", help="ACL token (default: $CONSUL_HTTP_TOKEN)")
    parser.add_argument("-n", type=int, default=1000, help="registrations (default: 1000)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16],
                        help="concurrent registering clients (default: 1 16)")
    parser.add_argument("--watchers", type=int, nargs="+", default=[10, 100, 1000],
                        help="fan-out sizes (default: 10 100 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per fan-out size")
    args = parser.parse_args()
    _raise_fd_limit(2 * max(args.watchers) + 256)
    trio.run(run_bench, args)


if __name__ == "__main__":
    main()
