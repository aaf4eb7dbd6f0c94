"""A small client the fault suite runs *inside* a network namespace (``ip netns exec NS python
nsagent.py ...``): the test process itself lives in the root namespace, which has no route to
the mesh's addresses. Every command prints one JSON document on stdout.

    get URL                       one GET: {"status", "body"} (body parsed when it is JSON)
    load URL [options]            bounded keep-alive load: counts per outcome and per version
    set-splits REGISTRY [options] route changes with check-and-set, as `meshd routes set-split`

Standard library only, except ``set-splits`` (meshd's own route store).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any
from urllib.parse import urlsplit


def cmd_get(args: argparse.Namespace) -> int:
    # no proxy: the namespaces have no route anywhere but the mesh
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(args.url, timeout=args.timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except OSError as exc:
        print(json.dumps({"status": 0, "body": None, "error": str(exc)}))
        return 0
    text = raw.decode(errors="replace")
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text
    print(json.dumps({"status": status, "body": body}))
    return 0


class Load:
    """``concurrency`` threads, each with one keep-alive connection, sending GETs until
    ``max_requests`` were sent in all, ``max_seconds`` passed, or ``stop_file`` exists."""

    def __init__(self, args: argparse.Namespace) -> None:
        url = urlsplit(args.url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.path = url.path + (f"?{url.query}" if url.query else "")
        self.args = args
        self.lock = threading.Lock()
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.versions: Counter[str] = Counter()
        self.hosts: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.errors: list[str] = []
        self.deadline = time.monotonic() + args.max_seconds
        self.started = time.monotonic()
        self.first_failure: float | None = None
        self.last_failure: float | None = None

    def _ticket(self) -> bool:
        with self.lock:
            if self.sent >= self.args.max_requests or time.monotonic() >= self.deadline:
                return False
            if self.args.stop_file and self.sent % 8 == 0 and os.path.exists(self.args.stop_file):
                self.deadline = 0.0
                return False
            self.sent += 1
            return True

    def _fail(self, what: str) -> None:
        now = time.monotonic() - self.started
        with self.lock:
            self.failed += 1
            self.statuses[what.split(":")[0]] += 1
            if len(self.errors) < 10:
                self.errors.append(f"t={now:.2f}s {what}")
            self.first_failure = now if self.first_failure is None else self.first_failure
            self.last_failure = now

    def worker(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while self._ticket():
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port,
                                                  timeout=self.args.timeout)
            try:
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = None
                self._fail(f"{type(exc).__name__}: {exc}")
                continue
            if response.will_close:
                conn.close()
                conn = None
            if response.status != 200:
                self._fail(f"{response.status}: {body[:160]!r}")
                continue
            try:
                answer = json.loads(body)
            except ValueError:
                self._fail(f"not JSON: {body[:160]!r}")
                continue
            with self.lock:
                self.ok += 1
                self.statuses["200"] += 1
                self.versions[str(answer.get("version"))] += 1
                self.hosts[str(answer.get("host"))] += 1
            if self.args.pause:
                time.sleep(self.args.pause)
        if conn is not None:
            conn.close()

    def run(self) -> dict[str, Any]:
        threads = [threading.Thread(target=self.worker, daemon=True)
                   for _ in range(self.args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.args.max_seconds + self.args.timeout + 5)
        elapsed = time.monotonic() - self.started
        return {"total": self.ok + self.failed, "ok": self.ok, "failed": self.failed,
                "versions": dict(self.versions), "hosts": dict(self.hosts),
                "statuses": dict(self.statuses), "errors": self.errors,
                "elapsed": round(elapsed, 3),
                "rate": round((self.ok + self.failed) / elapsed, 1) if elapsed else 0.0,
                "first_failure": self.first_failure, "last_failure": self.last_failure}


def cmd_load(args: argparse.Namespace) -> int:
    print(json.dumps(Load(args).run()))
    return 0


def cmd_set_splits(args: argparse.Namespace) -> int:
    from pathlib import Path

    import trio

    from meshd.registry.config_store import ConfigConflict, RouteConfigStore
    from meshd.registry.consul import ConsulClient
    from meshd.registry.operator_key import OperatorKey

    signer = OperatorKey.from_files(Path(args.operator_cert), Path(args.operator_key))

    splits = [{"v1": w, "v2": 100 - w} for w in (90, 50, 10, 70, 30)]

    async def main() -> dict[str, Any]:
        changes = conflicts = 0
        started = time.monotonic()
        async with ConsulClient(args.registry) as client:
            store = RouteConfigStore(client, signer=signer)
            with trio.move_on_after(args.max_seconds):
                while changes < args.count:
                    try:
                        await store.set_split(args.service, splits[changes % len(splits)])
                    except ConfigConflict:
                        conflicts += 1
                        continue
                    changes += 1
                    if args.pause:
                        await trio.sleep(args.pause)
                # leave the table where the caller wants it
                await store.set_split(args.service, {"v1": 100 - args.final_v2,
                                                     "v2": args.final_v2})
        return {"changes": changes, "conflicts": conflicts,
                "elapsed": round(time.monotonic() - started, 3)}

    print(json.dumps(trio.run(main)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("get")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_get)
    p = sub.add_parser("load")
    p.add_argument("url")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-requests", type=int, required=True)
    p.add_argument("--max-seconds", type=float, required=True)
    p.add_argument("--stop-file", default="")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--pause", type=float, default=0.0, help="seconds between a thread's requests")
    p.set_defaults(func=cmd_load)
    p = sub.add_parser("set-splits")
    p.add_argument("registry")
    p.add_argument("--service", default="payments")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--pause", type=float, default=0.02)
    p.add_argument("--final-v2", type=int, default=10)
    p.add_argument("--operator-cert", required=True, help="signs the route tables written")
    p.add_argument("--operator-key", required=True)
    p.set_defaults(func=cmd_set_splits)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
