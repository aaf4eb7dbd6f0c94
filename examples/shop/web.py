"""web: the shop demo's front door. Standard library only.

    GET /checkout   ->  calls payments through the mesh and returns its JSON answer
    GET /healthz    ->  200 ok
    GET /           ->  what to try

It reaches payments at --upstream (http://127.0.0.1:9191): the outbound listener meshd opens for
web's declared upstream. meshd picks payments v1 or v2 by the split in routes.toml and carries the
request over mutual TLS; web only ever speaks plain HTTP to localhost.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from urllib.parse import parse_qs, urlsplit

INDEX = b"""shop web: try
  curl http://127.0.0.1:8080/checkout          (payments answers; ~10% of them are v2)
  curl http://127.0.0.1:8080/checkout?amount=7
"""


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to one upstream, shared by the handler threads.

    A connection that sat idle may have been closed by the other side; a request that fails on
    such a reused connection before any answer arrived is retried once on a fresh connection
    (what browsers and urllib3 do), and the other idle connections are dropped: whatever closed
    one (a restarted meshd, or one draining) closed them all. Any other failure is the
    caller's to report."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: bytes,
                headers: dict[str, str]) -> tuple[int, str, bytes]:
        for attempt in (1, 2):
            conn, reused = self._take(fresh=attempt > 1)
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (ConnectionResetError, BrokenPipeError, http.client.BadStatusLine):
                conn.close()
                if reused and attempt == 1:
                    self._drop_idle()
                    continue
                raise
            except (OSError, http.client.HTTPException):
                conn.close()
                raise
            if response.will_close:
                conn.close()
            else:
                self._give_back(conn)
            return response.status, response.getheader("Content-Type", ""), data
        raise AssertionError("unreachable")

    def _take(self, fresh: bool = False) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._idle and not fresh:
                return self._idle.pop(), True
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout), False

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.append(conn)


class WebServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops the SYNs of a burst (the requests a restarted
    # meshd's queue releases at once), and each dropped one waits a second for its retransmit
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], upstream: UpstreamPool,
                 access_log: bool) -> None:
        super().__init__(address, WebHandler)
        self.upstream = upstream
        self.access_log = access_log


class WebHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body go out in two writes: no 40 ms stall
    server: WebServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._send(200, "text/plain", b"ok\n")
        elif url.path == "/checkout":
            self._checkout(parse_qs(url.query).get("amount", ["42"])[0])
        elif url.path == "/":
            self._send(200, "text/plain", INDEX)
        else:
            self._send(404, "text/plain", b"not found\n")

    def _checkout(self, amount_text: str) -> None:
        try:
            amount = int(amount_text)
        except ValueError:
            self._send(400, "application/json", b'{"error": "amount must be an integer"}\n')
            return
        headers = {"Content-Type": "application/json"}
        if "traceparent" in self.headers:   # keep the trace going through the mesh
            headers["traceparent"] = self.headers["traceparent"]
        try:
            status, content_type, body = self.server.upstream.request(
                "POST", "/pay", json.dumps({"amount": amount}).encode(), headers)
        except (OSError, http.client.HTTPException) as exc:
            error = {"service": "web", "error": f"payments unreachable: {exc}"}
            self._send(502, "application/json", json.dumps(error).encode() + b"\n")
            return
        self._send(status, content_type or "application/json", body)

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.access_log:
            super().log_message(format, *args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--version", default="v1")
    parser.add_argument("--upstream", default="http://127.0.0.1:9191",
                        help="payments, through meshd's outbound listener")
    parser.add_argument("--timeout", type=float, default=5.0, help="upstream timeout (s)")
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args(argv)
    upstream_url = urlsplit(args.upstream)
    if upstream_url.scheme != "http" or not upstream_url.hostname:
        parser.error(f"--upstream must be http://HOST:PORT, got {args.upstream!r}")
    pool = UpstreamPool(upstream_url.hostname, upstream_url.port or 80, args.timeout)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    server = WebServer((args.address, args.port), pool, args.access_log)
    print(f"web {args.version}: listening on http://{args.address}:{args.port}, "
          f"payments via {args.upstream}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print("web: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
