"""payments: the shop demo's backend. Standard library only.

    POST /pay {"amount": 42}  ->  {"service": "payments", "version": "v1", "host": "host-b",
                                   "amount": 42}
    GET  /pay?amount=42       ->  the same
    GET  /healthz               ->  200 ok

With --bank URL (the outbound listener its meshd opens for the upstream "bank", a service
outside the mesh), each payment is first charged there (POST /charge) and the bank's answer is
part of the reply: {..., "bank": {"charge": "ch-1", "approved": true, ...}}; a bank that cannot
be reached makes the payment fail with a 502 that says why.

It knows nothing about the mesh: meshd's inbound listener on its host terminates mTLS and forwards
plain HTTP to it, and its meshd speaks TLS to the bank for it.
"""

from __future__ import annotations

import argparse
import http.client
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
                 access_log: bool, bank: tuple[str, int] | None = None) -> None:
        super().__init__(address, PaymentsHandler)
        self.version = version
        self.node = node
        self.access_log = access_log
        self.bank = bank


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
        answer: dict[str, object] = {"service": "payments", "version": self.server.version,
                                     "host": self.server.node, "amount": amount}
        status = 200
        if self.server.bank is not None:
            status, answer["bank"] = self._charge(self.server.bank, amount)
        self._send(status, json.dumps(answer).encode() + b"\n", "application/json")

    def _charge(self, bank: tuple[str, int], amount: object) -> tuple[int, object]:
        """POST /charge to the bank; (200, its answer), or (502, why it failed)."""
        conn = http.client.HTTPConnection(*bank, timeout=5)
        try:
            conn.request("POST", "/charge", json.dumps({"amount": amount}).encode(),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                reason = response.getheader("x-meshd-reason") or body.decode(errors="replace")
                return 502, {"error": f"bank answered {response.status}: {reason.strip()}"}
            return 200, json.loads(body)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return 502, {"error": f"bank unreachable: {exc}"}
        finally:
            conn.close()

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
    parser.add_argument("--bank", help="http://HOST:PORT of the bank (through meshd), if any")
    args = parser.parse_args(argv)
    bank = None
    if args.bank is not None:
        bank_url = urlsplit(args.bank)
        if bank_url.scheme != "http" or not bank_url.hostname:
            parser.error(f"--bank must be http://HOST:PORT, got {args.bank!r}")
        bank = (bank_url.hostname, bank_url.port or 80)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    server = PaymentsServer((args.address, args.port), args.version, args.node, args.access_log,
                            bank)
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
