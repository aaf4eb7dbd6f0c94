"""The shop demo's apps on their own (web calling payments directly, no mesh): what they answer,
keep-alive, reconnecting after payments restarts, and a clean exit on SIGTERM."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from net_testing import free_port

SHOP = Path(__file__).resolve().parents[2] / "examples" / "shop"


def wait_listening(address: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{address}:{port} never listened")


def start(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(SHOP / script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()


class Shop:
    def __init__(self) -> None:
        self.pay_port = free_port("127.0.0.3")
        self.web_port = free_port("127.0.0.1")
        self.payments = self.start_payments()
        self.web = start("web.py", "--port", str(self.web_port),
                         "--upstream", f"http://127.0.0.3:{self.pay_port}")
        wait_listening("127.0.0.1", self.web_port, self.web)

    def start_payments(self) -> subprocess.Popen[bytes]:
        proc = start("payments.py", "--address", "127.0.0.3", "--port", str(self.pay_port),
                     "--version", "v2", "--node", "host-c")
        wait_listening("127.0.0.3", self.pay_port, proc)
        return proc


@pytest.fixture
def shop() -> Iterator[Shop]:
    s = Shop()
    yield s
    for proc in (s.web, s.payments):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def test_checkout_returns_the_answer_of_payments(shop: Shop) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", shop.web_port, timeout=5)
    status, body = get(conn, "/checkout?amount=7")
    assert status == 200
    assert json.loads(body) == {"service": "payments", "version": "v2", "host": "host-c",
                                "amount": 7}
    assert get(conn, "/healthz") == (200, b"ok\n")
    status, body = get(conn, "/")
    assert status == 200 and b"/checkout" in body
    assert get(conn, "/nope")[0] == 404
    assert get(conn, "/checkout?amount=x")[0] == 400
    conn.close()


def test_web_reconnects_after_payments_restarts(shop: Shop) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", shop.web_port, timeout=5)
    assert get(conn, "/checkout")[0] == 200     # web now holds a keep-alive connection
    assert stop(shop.payments) == 0
    status, body = get(conn, "/checkout")
    assert status == 502 and b"payments unreachable" in body
    shop.payments = shop.start_payments()
    assert get(conn, "/checkout")[0] == 200
    assert get(conn, "/checkout")[0] == 200
    conn.close()


def test_apps_exit_cleanly_on_sigterm(shop: Shop) -> None:
    assert stop(shop.web) == 0
    assert stop(shop.payments) == 0
    assert b"web: stopped" in shop.web.communicate()[0]
    assert b"payments: stopped" in shop.payments.communicate()[0]
