"""HTTP/1.1 correctness and limits on the listeners: request smuggling (one test per case),
head limits (431) and deadline (408), body limit (413), hop-by-hop headers, request identity
(X-Request-Id, traceparent), Expect: 100-continue, Upgrade (access log lines:
``test_access_log``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from proxy_mesh_testing import Host, Mesh, make_host
from proxy_testing import MiniCA, eventually, read_until_eof, sample

from meshd.config.routes import parse_routes
from meshd.config.schema import LocalService, Upstream
from meshd.proxy.core.http1 import RequestHead
from meshd.proxy.core.trace import identify, next_traceparent
from meshd.proxy.core.view import ViewCell
from meshd.proxy.exchange import RequestSource
from meshd.proxy.forward import ClientConnection, serve_requests
from meshd.registry.model import Endpoint, EndpointSet


async def _raw(mesh: Mesh, data: bytes, upstream: str = "payments") -> bytes:
    host, port = mesh.a.proxy.outbound_address("web", upstream)
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(data)
    return await read_until_eof(stream)


def _status(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert match, answer[:80]
    return int(match.group(1))


# -- smuggling: refused with 400, the connection closed, nothing reaches the app --------------

SMUGGLING = {
    "content-length-with-transfer-encoding":
        b"POST /version HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
    "differing-duplicate-content-length":
        b"POST /version HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\n"
        b"hello",
    "list-content-length":
        b"POST /version HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 40\r\n\r\nhello",
    "bad-chunk-size":
        b"POST /version HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5x\r\nhello\r\n0\r\n\r\n",
    "overflowing-chunk-size":
        b"POST /version HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"10000000000000000\r\nhello\r\n0\r\n\r\n",
    "chunk-without-crlf":
        b"POST /version HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhelloGET / HTTP/1.1\r\n\r\n",
    "obs-fold":
        b"GET /version HTTP/1.1\r\nHost: a\r\nX-Long: a\r\n b\r\n\r\n",
    "bare-lf-in-head":
        b"GET /version HTTP/1.1\nHost: a\n\n",
    "bare-lf-after-a-header":
        b"GET /version HTTP/1.1\r\nHost: a\nTransfer-Encoding: chunked\r\n\r\n",
    "transfer-encoding-not-chunked":
        b"POST /version HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "transfer-encoding-in-http-1.0":
        b"POST /version HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "space-before-colon":
        b"POST /version HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", list(SMUGGLING))
async def test_smuggling_refused_with_400_and_closed(mesh: Mesh, case: str) -> None:
    mesh.set_payments((("v1", 100), ("v2", 0)))
    answer = await _raw(mesh, SMUGGLING[case])  # read to EOF: the connection was closed
    assert _status(answer) == 400, answer
    assert answer.count(b"HTTP/1.1 ") == 1  # nothing smuggled got its own answer
    assert mesh.v1.requests == 0 or case in ("bad-chunk-size", "overflowing-chunk-size",
                                             "chunk-without-crlf")
    assert all(s["path"] != "/admin" for s in mesh.v1.seen)


# -- head limits and deadline ---------------------------------------------------------------------

async def test_too_many_or_too_large_headers_are_431(mesh: Mesh) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    assert _status(await _raw(mesh, b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")) == 431
    big = b"X-Big: " + b"a" * 70_000 + b"\r\n"
    assert _status(await _raw(mesh, b"GET / HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n")) == 431


async def _echo_handler(request: RequestHead, source: RequestSource,
                        conn: ClientConnection) -> bool:
    source.take_empty_body()
    await source.stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
    return True


async def test_slow_head_is_408_but_an_idle_connection_just_closes(
        autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_requests, server, ClientConnection("peer"), _echo_handler,
                           60.0, None, 10.0)
        await client.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert await client.receive_some() == b"HTTP/1.1 204 No Content\r\n\r\n"
        await trio.sleep(50)  # idle between requests: within the idle timeout

        async def slowloris() -> None:  # one byte a second, never the end of the head
            for byte in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: abcdefghijklmnop":
                await client.send_all(bytes([byte]))
                await trio.sleep(1)

        nursery.start_soon(slowloris)
        answer = await client.receive_some()
        assert trio.current_time() == pytest.approx(50 + 10)  # from its first byte
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert b"connection: close" in answer
        nursery.cancel_scope.cancel()

    client, server = trio.testing.memory_stream_pair()
    started = trio.current_time()
    await serve_requests(server, ClientConnection("peer"), _echo_handler, 60.0, None, 10.0)
    assert trio.current_time() - started == pytest.approx(60.0)
    await server.aclose()
    assert await client.receive_some() == b""  # closed without a word


class _OneRequest(trio.abc.Stream):
    """A client whose one request arrives when ``arrive`` is set, then nothing more."""

    def __init__(self) -> None:
        self.arrive = trio.Event()
        self.sent = b""
        self._given = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._given:
            await trio.sleep_forever()
        await self.arrive.wait()
        self._given = True
        return b"GET /late HTTP/1.1\r\nHost: a\r\n\r\n"

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += bytes(data)
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("race", ["drain", "idle deadline"])
async def test_a_request_arriving_as_the_wait_ends_is_still_served(
        race: str, autojump_clock: trio.testing.MockClock) -> None:
    """The request's bytes and a drain (or the idle deadline) land in the same scheduler pass:
    the bytes were read, so the request is served, never dropped unanswered."""
    client = _OneRequest()
    conn = ClientConnection("peer")

    async def handler(request: RequestHead, source: RequestSource,
                      conn: ClientConnection) -> bool:
        await trio.sleep(0.1)  # a real handler waits for its upstream before it answers
        return await _echo_handler(request, source, conn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_requests, client, conn, handler, 120.0)
        await trio.testing.wait_all_tasks_blocked()
        if race == "drain":
            client.arrive.set()
            conn.draining = True
            assert conn.idle_scope is not None
            conn.idle_scope.cancel()  # what Proxy.drain does
        else:
            await trio.sleep_until(119.999)
            client.arrive.set()
            autojump_clock.jump(0.001)
    assert client.sent == b"HTTP/1.1 204 No Content\r\n\r\n"


# -- body limit -----------------------------------------------------------------------------------

def _limit(view: ViewCell, service: str, limit: int, **extra: Any) -> None:
    entry = {"policy": {"max_request_bytes": limit}, **extra}
    view.set_routes(parse_routes({"default_policy": "allow",
                                  "destinations": {service: entry}}))


async def test_body_over_the_limit_is_413(mesh: Mesh) -> None:
    _limit(mesh.view, "payments", 10, subsets={"v1": {"version": "v1"}}, split={"v1": 100})
    answer = await _raw(mesh, b"POST /sha HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n")
    assert _status(answer) == 413 and b"connection: close" in answer
    chunked = (b"POST /sha HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"6\r\nabcdef\r\n6\r\nghijkl\r\n0\r\n\r\n")
    assert _status(await _raw(mesh, chunked)) == 413
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        assert (await client.post("/sha", content=b"0123456789")).status_code == 200
    assert sample(mesh.a.metrics, "meshd_requests_total", direction="outbound", source="web",
                  destination="payments", subset="v1", code="413") == 2


async def test_inbound_side_enforces_its_own_limit(mesh: Mesh) -> None:
    mesh.set_payments((("v1", 100), ("v2", 0)))
    _limit(mesh.b.proxy.view, "payments", 4)
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        assert (await client.post("/sha", content=b"12345")).status_code == 413
        assert (await client.post("/sha", content=b"1234")).status_code == 200
    assert mesh.v1.requests == 1


# -- headers --------------------------------------------------------------------------------------

async def test_hop_by_hop_headers_do_not_cross(mesh: Mesh) -> None:
    mesh.set_payments((("v1", 100), ("v2", 0)))
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        response = await client.get("/version", headers={
            "connection": "x-private", "x-private": "1", "keep-alive": "timeout=5",
            "te": "trailers", "proxy-authorization": "secret", "x-end-to-end": "yes"})
    seen = response.json()["headers"]
    assert seen["x-end-to-end"] == "yes"
    for name in ("x-private", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert name not in seen
    assert "keep-alive" not in response.headers


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_request_id_and_traceparent(mesh: Mesh) -> None:
    mesh.set_payments((("v1", 100), ("v2", 0)))
    sent = f"00-{TRACE}-00f067aa0ba902b7-01"
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        given = (await client.get("/version", headers={
            "x-request-id": "req-42", "traceparent": sent})).json()["headers"]
        made = (await client.get("/version")).json()["headers"]
    assert given["x-request-id"] == "req-42"
    version, trace, span, flags = given["traceparent"].split("-")
    assert (version, trace, flags) == ("00", TRACE, "01")
    assert span != "00f067aa0ba902b7"  # each hop is a new span
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                        made["x-request-id"])
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", made["traceparent"])


def test_traceparent_table() -> None:
    ones = lambda n: b"\x11" * n  # noqa: E731
    assert next_traceparent(b"00-%s-00f067aa0ba902b7-01" % TRACE.encode(), ones) == \
        b"00-%s-1111111111111111-01" % TRACE.encode()
    fresh = b"00-" + b"11" * 16 + b"-1111111111111111-00"
    for bad in (None, b"garbage", b"ff-%s-00f067aa0ba902b7-01" % TRACE.encode(),
                b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", b"00-%s-" % TRACE.encode() +
                b"0" * 16 + b"-01"):
        assert next_traceparent(bad, ones) == fresh
    twice = ((b"traceparent", b"00-%s-00f067aa0ba902b7-01" % TRACE.encode()),) * 2
    assert identify(twice, ones).traceparent == fresh
    assert identify(((b"X-Request-Id", b"bad id\x01"),), ones).request_id == \
        "11111111-1111-1111-1111-111111111111"


# -- Expect: 100-continue and Upgrade, through both hops ----------------------------------------

@dataclass
class ScriptedApp:
    """``/continue``: answers 100 Continue, reads the Content-Length body, answers its size;
    an upgrade request: 101, then echoes bytes upper-cased."""

    port: int = 0
    heads: list[bytes] | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listener.socket.getsockname()[1]
        self.heads = []
        task_status.started()
        await trio.serve_listeners(self._connection, [listener])

    async def _connection(self, stream: trio.SocketStream) -> None:
        buffer = b""
        try:
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive_some(65536)
            head, rest = buffer.split(b"\r\n\r\n", 1)
            assert self.heads is not None
            self.heads.append(head)
            lower = head.lower()
            if head.startswith(b"POST /continue"):
                length = int(re.search(rb"content-length: (\d+)", lower).group(1))  # type: ignore[union-attr]
                await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                while len(rest) < length:
                    rest += await stream.receive_some(65536)
                body = b"got %d" % length
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                      % (len(body), body))
            elif b"upgrade: websocket" in lower:
                await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\n"
                                      b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                if rest:
                    await stream.send_all(rest.upper())
                while data := await stream.receive_some(65536):
                    await stream.send_all(data.upper())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


@dataclass
class Pair:
    a: Host
    b: Host
    app: ScriptedApp

    async def connect(self) -> trio.SocketStream:
        host, port = self.a.proxy.outbound_address("web", "app")
        return await trio.open_tcp_stream(host, port)


@pytest.fixture
async def pair(tmp_path: Path, nursery: trio.Nursery) -> Pair:
    ca = MiniCA.create()
    app = ScriptedApp()
    await nursery.start(app.serve)
    b = make_host(ca, tmp_path, "b", [LocalService("app", app.port)])
    view = ViewCell()
    a = make_host(ca, tmp_path, "a", [LocalService("web", 1, upstreams=(Upstream("app", 0),))],
              view)
    for host in (b, a):
        await nursery.start(host.proxy.run)
    # a route timeout, which must not cut an upgraded connection
    view.set_routes(parse_routes({"destinations": {"app": {"timeout": "1s"}}}))
    view.set_endpoints(EndpointSet("app", (Endpoint("app", "app-v1", "b", "127.0.0.1",
                                                    b.port, "v1"),), 1, 0.0))
    return Pair(a, b, app)


async def _read_head(stream: trio.abc.ReceiveStream) -> tuple[bytes, bytes]:
    buffer = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive_some(65536)
    head, rest = buffer.split(b"\r\n\r\n", 1)
    return head, rest


async def test_expect_100_continue_is_forwarded_and_the_100_relayed(pair: Pair) -> None:
    stream = await pair.connect()
    await stream.send_all(b"POST /continue HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n"
                          b"Expect: 100-continue\r\n\r\n")
    head, rest = await _read_head(stream)  # the body is sent only after the 100
    assert head == b"HTTP/1.1 100 Continue"
    await stream.send_all(b"hello")
    buffer = rest
    with trio.fail_after(5):
        while not buffer.endswith(b"got 5"):
            buffer += await stream.receive_some(65536)
    assert buffer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert pair.app.heads is not None and b"expect: 100-continue" in pair.app.heads[0].lower()


async def test_websocket_upgrade_tunnels_bytes_through_both_hops(pair: Pair) -> None:
    stream = await pair.connect()
    await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\nearly")
    head, rest = await _read_head(stream)
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"upgrade: websocket" in head.lower() and b"connection: upgrade" in head.lower()
    received = rest
    with trio.fail_after(5):
        while received != b"EARLY":
            received += await stream.receive_some(65536)
    await trio.sleep(1.5)  # past the route timeout: the tunnel stays
    for message in (b"frame one", b"frame two"):
        await stream.send_all(message)
        got = b""
        with trio.fail_after(5):
            while len(got) < len(message):
                got += await stream.receive_some(65536)
        assert got == message.upper()
    await stream.send_eof()
    assert await read_until_eof(stream) == b""
    assert pair.app.heads is not None
    app_head = pair.app.heads[0].lower()
    assert b"upgrade: websocket" in app_head and b"connection: upgrade" in app_head
    await eventually(lambda: sample(  # counted once the tunnel ended
        pair.a.metrics, "meshd_requests_total", direction="outbound", source="web",
        destination="app", subset="", code="101") == 1)
