"""End to end through three in-process meshd proxies: app → a (outbound) → mTLS → b/c (inbound)
→ app, over real loopback sockets."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import trio
from proxy_mesh_testing import Mesh
from proxy_testing import duplex_exchange, read_until_eof, sample

from meshd.config.routes import parse_routes


async def test_split_reaches_both_versions_with_identity(mesh: Mesh) -> None:
    versions: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        for _ in range(40):
            response = await client.get("/version")
            assert response.status_code == 200
            body = response.json()
            versions[body["version"]] += 1
            assert body["headers"]["x-meshd-source"] == "web"
            assert "127.0.0.1" in body["headers"]["x-forwarded-for"]
    assert set(versions) == {"v1", "v2"}
    assert min(versions.values()) >= 5  # 50/50 over 40 draws: P(fewer than 5) < 1e-6
    m = mesh.a.metrics
    for version in ("v1", "v2"):
        assert sample(m, "meshd_requests_total", direction="outbound", source="web",
                      destination="payments", subset=version, code="200") == versions[version]
    assert sample(mesh.b.metrics, "meshd_requests_total", direction="inbound", source="web",
                  destination="payments", subset="v1", code="200",
                  mtls="true") == versions["v1"]


async def test_source_header_cannot_be_forged(mesh: Mesh) -> None:
    mesh.set_payments((("v1", 100), ("v2", 0)))
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        response = await client.get("/version", headers={"x-meshd-source": "admin"})
    assert response.json()["headers"]["x-meshd-source"] == "web"


async def test_keep_alive_reuses_mesh_and_app_connections(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        for _ in range(30):
            assert (await client.get("/version")).status_code == 200
    # one mTLS connection (one handshake) per endpoint, one app connection per backend
    assert mesh.a.proxy.pool.opened == 2
    assert mesh.v1.connections == 1
    assert mesh.v2.connections == 1
    assert mesh.v1.requests + mesh.v2.requests == 30


async def test_pooled_mesh_connections_close_after_the_destinations_idle_timeout(
        mesh: Mesh) -> None:
    mesh.view.set_routes(parse_routes({"destinations": {"payments": {
        "subsets": {"v1": {"version": "v1"}}, "split": {"v1": 100},
        "policy": {"idle_timeout": "300ms"}}}}))
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        assert (await client.get("/version")).status_code == 200
        assert (await client.get("/version")).status_code == 200  # within 300 ms: reused
        assert mesh.a.proxy.pool.opened == 1
        await trio.sleep(0.6)
        assert mesh.a.proxy.pool.idle_count == 0  # the reaper closed it
        assert (await client.get("/version")).status_code == 200
    assert mesh.a.proxy.pool.opened == 2


async def test_tcp_connection_is_closed_after_the_destinations_idle_timeout(
        mesh: Mesh) -> None:
    mesh.view.set_routes(parse_routes({"destinations": {"ledger": {
        "policy": {"idle_timeout": "400ms"}}}}))
    host, port = mesh.a.proxy.outbound_address("web", "ledger")
    stream = await trio.open_tcp_stream(host, port)
    with trio.fail_after(5):
        for _ in range(5):  # a byte every 200 ms for a second: never idle for 400 ms
            await trio.sleep(0.2)
            await stream.send_all(b"x")
            assert await stream.receive_some(100) == b"x"
        quiet_since = trio.current_time()
        assert await read_until_eof(stream) == b""  # closed, without the app's <eof>
    assert 0.35 <= trio.current_time() - quiet_since < 2.0
    await stream.aclose()


async def test_response_with_connection_close_is_not_reused(mesh: Mesh) -> None:
    mesh.set_payments((("v1", 100), ("v2", 0)))
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        for _ in range(3):
            response = await client.get("/close")
            assert response.status_code == 200
    # b's app connection closes each time; the mesh hop a→b is still reused
    assert mesh.v1.connections == 3
    assert mesh.a.proxy.pool.opened == 1


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def test_chunked_request_body(mesh: Mesh) -> None:
    payload = os.urandom(300_000)
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        response = await client.post("/sha", content=_chunks(payload, 7000))
    body = response.json()
    assert response.status_code == 200
    assert body["headers"]["transfer-encoding"] == "chunked"
    assert body["size"] == len(payload)
    assert body["sha256"] == hashlib.sha256(payload).hexdigest()


async def test_large_body_streams_both_ways(mesh: Mesh) -> None:
    payload = os.urandom(20 * 1024 * 1024)
    host, port = mesh.a.proxy.outbound_address("web", "payments")
    stream = await trio.open_tcp_stream(host, port)
    with trio.fail_after(20):
        status, size, digest = await duplex_exchange(stream, "/echo", payload)
    assert status == 200
    assert size == len(payload)
    assert digest == hashlib.sha256(payload).hexdigest()


async def test_large_response_with_content_length(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.url(), timeout=30) as client:
        response = await client.get("/big", params={"n": 5_000_001})
    assert response.status_code == 200
    assert response.headers["content-length"] == "5000001"
    assert len(response.content) == 5_000_001


async def test_head_request_keeps_connection_usable(mesh: Mesh) -> None:
    mesh.set_payments((("v1", 100), ("v2", 0)))
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        head = await client.head("/version")
        assert head.status_code == 200
        assert int(head.headers["content-length"]) > 0
        assert head.content == b""
        assert (await client.get("/version")).json()["version"] == "v1"
    assert mesh.a.proxy.pool.opened == 1


async def test_no_endpoint_is_503_with_reason(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.url("orders")) as client:
        response = await client.get("/")
    assert response.status_code == 503
    assert "orders" in response.headers["x-meshd-reason"]
    assert "no endpoints known for orders" in response.text
    mesh.set_endpoints("payments", [mesh.endpoint("payments", mesh.c, "v2")])
    mesh.set_payments((("v1", 100), ("v2", 0)))
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        response = await client.get("/")
    assert response.status_code == 503
    assert response.headers["x-meshd-reason"] == \
        "no healthy endpoint of payments in subset v1"
    assert sample(mesh.a.metrics, "meshd_requests_total", direction="outbound", source="web",
                  destination="payments", subset="v1", code="503") == 1


async def test_endpoint_down_is_503_with_its_code(mesh: Mesh) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    dead_port = listener.getsockname()[1]
    listener.close()  # bound, never listening: connections are refused
    mesh.set_payments((("v1", 100), ("v2", 0)))
    mesh.set_endpoints("payments", [mesh.endpoint("payments", mesh.b, "v1", port=dead_port)])
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        response = await client.get("/version")
    assert response.status_code == 503  # nothing reached an app
    assert response.headers["x-meshd-error"] == "connect-failed"
    assert "cannot connect" in response.text
    # no other endpoint to try: the implicit retries do not hammer the dead one
    assert sample(mesh.a.metrics, "meshd_connection_errors_total", direction="outbound",
                  reason="connect_failed") == 1


async def test_route_timeout_is_504(mesh: Mesh) -> None:
    mesh.set_payments(timeout=0.3)
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        start = trio.current_time()
        response = await client.get("/slow", params={"delay": "3"})
        elapsed = trio.current_time() - start
        assert response.status_code == 504
        assert elapsed < 2
        # the connection to the app is still good for the next request
        assert (await client.get("/version")).status_code == 200


async def test_malformed_response_from_app_is_502(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.url("broken")) as client:
        response = await client.get("/")
    assert response.status_code == 502
    assert response.headers["x-meshd-error"] == "app-bad-response"  # from b's meshd
    assert sample(mesh.b.metrics, "meshd_requests_total", direction="inbound", source="web",
                  destination="broken", subset="v1", code="502") == 1


async def test_malformed_request_is_400_and_closed(mesh: Mesh) -> None:
    host, port = mesh.a.proxy.outbound_address("web", "payments")
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                          b"Content-Length: 2\r\n\r\nab")
    answer = await read_until_eof(stream)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in answer.lower()
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(b"\x16\x03\x01 not http at all\r\n\r\n")
    assert (await read_until_eof(stream)).startswith(b"HTTP/1.1 400 ")


async def test_pipelined_requests_and_http10(mesh: Mesh) -> None:
    mesh.set_payments((("v1", 100), ("v2", 0)))
    host, port = mesh.a.proxy.outbound_address("web", "payments")
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"GET /version HTTP/1.0\r\n\r\n")
    answer = await read_until_eof(stream)  # HTTP/1.0 without keep-alive: closed after
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert answer.count(b'"version": "v1"') == 2


async def test_tcp_through_the_mesh_with_half_close(mesh: Mesh) -> None:
    host, port = mesh.a.proxy.outbound_address("web", "ledger")
    stream = await trio.open_tcp_stream(host, port)
    payload = os.urandom(1_000_000)
    received = bytearray()

    async def reader() -> None:
        received.extend(await read_until_eof(stream, limit=10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for i in range(0, len(payload), 50_000):
            await stream.send_all(payload[i:i + 50_000])
        await stream.send_eof()
    # the echo server only sends <eof> after it saw our half-close, through both hops
    assert bytes(received) == payload + b"<eof>"
    await stream.aclose()
    assert sample(mesh.a.metrics, "meshd_tcp_connections_opened_total", direction="outbound",
                  source="web", destination="ledger", subset="") == 1
    assert sample(mesh.b.metrics, "meshd_tcp_bytes_total", direction="inbound",
                  destination="ledger", flow="sent") == len(payload)
