"""bank: a stand-in for an API outside the mesh (a card processor, say). Standard library only.

    POST /charge {"amount": 42}  ->  {"bank": "stand-in bank", "charge": "ch-1",
                                      "amount": 42, "approved": true}
    GET  /healthz                ->  200 ok

It speaks HTTPS with its own certificate (`meshd up` makes one, and the CA that signed it,
for the name in mesh.toml's [[external]] tls_name). It knows nothing about the mesh: payments
calls it at http://127.0.0.1:<local_port> (the outbound listener its meshd opens for the
upstream "bank"), and that meshd originates TLS to it, verifying its certificate against the
CA that routes.toml's destinations.bank names (meshd up fills in the one it made).
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType


class BankServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext) -> None:
        super().__init__(address, BankHandler)
        self.context = context
        self.charges = itertools.count(1)

    def get_request(self) -> tuple[object, object]:
        # the handshake happens on the handler's first read, in its thread
        sock, peer = super().get_request()
        return self.context.wrap_socket(sock, server_side=True,
                                        do_handshake_on_connect=False), peer

    def handle_error(self, request: object, client_address: object) -> None:
        # a client that refused our certificate, or went away: one line, not a traceback
        print(f"bank: connection from {client_address}: {sys.exc_info()[1]}", flush=True)


class BankHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: BankServer

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/charge":
            self._send(404, b"not found\n", "text/plain")
            return
        try:
            amount = json.loads(body or b"{}").get("amount", 0)
        except (ValueError, AttributeError):
            self._send(400, b'{"error": "expected a JSON object"}\n', "application/json")
            return
        answer = {"bank": "stand-in bank", "charge": f"ch-{next(self.server.charges)}",
                  "amount": amount, "approved": True}
        self._send(200, json.dumps(answer).encode() + b"\n", "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9443)
    parser.add_argument("--cert", required=True, help="server certificate (PEM)")
    parser.add_argument("--key", required=True, help="its private key (PEM)")
    args = parser.parse_args(argv)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.cert, args.key)
    server = BankServer((args.address, args.port), context)
    print(f"bank: listening on https://{args.address}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print("bank: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
