"""payments: the shop demo's backend. Standard library only.

    POST /pay {"amount": 42}  ->  {"service": "payments", "version": "v1", "host": "host-b",
                                   "amount": 42}
    GET  /pay?amount=42       ->  the same
    GET  /healthz               ->  200 ok

It knows nothing about the mesh: meshd's inbound listener on its host terminates mTLS and forwards
plain HTTP to it.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from urllib.parse import parse_qs, urlsplit


class PaymentsServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops the SYNs of a burst (the requests a restarted
    # meshd's queue releases at once), and each dropped one waits a second for its retransmit
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], version: str, node: str,
                 access_log: bool) -> None:
        super().__init__(address, PaymentsHandler)
        self.version = version
        self.node = node
        self.access_log = access_log


class PaymentsHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: every answer carries Content-Length
    disable_nagle_algorithm = True  # head and body go out in two writes: no 40 ms stall
    server: PaymentsServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        elif url.path == "/pay":
            amount = parse_qs(url.query).get("amount", ["0"])[0]
            self._pay(amount)
        elif url.path == "/":
            self._send(200, b"payments: POST /pay {\"amount\": 42}\n", "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if urlsplit(self.path).path != "/pay":
            self._send(404, b"not found\n", "text/plain")
            return
        try:
            amount = json.loads(body or b"{}").get("amount", 0)
        except (ValueError, AttributeError):
            self._send(400, b'{"error": "expected a JSON object"}\n', "application/json")
            return
        self._pay(amount)

    def _pay(self, amount: object) -> None:
        answer = {"service": "payments", "version": self.server.version,
                  "host": self.server.node, "amount": amount}
        self._send(200, json.dumps(answer).encode() + b"\n", "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
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
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--version", default="v1")
    parser.add_argument("--node", default=socket.gethostname(), help="host name to report")
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args(argv)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    server = PaymentsServer((args.address, args.port), args.version, args.node, args.access_log)
    print(f"payments {args.version} on {args.node}: listening on "
          f"http://{args.address}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print("payments: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
