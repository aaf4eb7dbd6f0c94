"""What the inbound listener refuses, and the outbound check of the server's identity."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import httpx
import pytest
import trio
from proxy_mesh_testing import Mesh
from proxy_testing import MiniCA, client_context, read_until_eof, sample


async def _expect_refused(mesh: Mesh, reason: str, caplog: pytest.LogCaptureFixture,
                          ctx: ssl.SSLContext, sni: str = "payments") -> None:
    transport = await trio.open_tcp_stream("127.0.0.1", mesh.b.port)
    stream = trio.SSLStream(transport, ctx, server_hostname=sni)
    # TLS 1.3: the client may finish its side of the handshake before the server refuses it,
    # so the refusal shows up at the latest on the first read.
    with pytest.raises(trio.BrokenResourceError):
        with trio.fail_after(5):
            await stream.do_handshake()
            await stream.send_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await stream.receive_some(65536)
            if not data:
                raise trio.BrokenResourceError("closed")
    assert sample(mesh.b.metrics, "meshd_connection_errors_total", direction="inbound",
                  reason=reason) == 1
    assert f"refused ({reason})" in caplog.text
    assert mesh.v1.requests == 0


async def test_plaintext_http_is_closed(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meshd.proxy")
    stream = await trio.open_tcp_stream("127.0.0.1", mesh.b.port)
    await stream.send_all(b"GET /version HTTP/1.1\r\nHost: payments\r\n\r\n")
    answer = await read_until_eof(stream)
    assert not answer.startswith(b"HTTP/")
    assert sample(mesh.b.metrics, "meshd_connection_errors_total", direction="inbound",
                  reason="plaintext") == 1
    assert "refused (plaintext)" in caplog.text
    assert mesh.v1.requests == 0


async def test_plaintext_tcp_is_closed(mesh: Mesh) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", mesh.b.port)
    await stream.send_all(b"hello there, this is not TLS\n")
    assert b"hello" not in await read_until_eof(stream)
    assert mesh.echo.connections == 0


async def test_client_without_certificate_is_refused(
        mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=mesh.ca.pem.decode())
    await _expect_refused(mesh, "no_client_cert", caplog, ctx)


async def test_certificate_from_another_ca_is_refused(
        mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    other = MiniCA.create("someone else's root")
    cert, key = other.files(tmp_path, "spiffe://mesh.test/svc/web")
    await _expect_refused(mesh, "untrusted_chain", caplog, client_context(mesh.ca, cert, key))


async def test_right_ca_wrong_trust_domain_is_refused(
        mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = mesh.ca.files(tmp_path, "spiffe://elsewhere.test/svc/web")
    await _expect_refused(mesh, "foreign_trust_domain", caplog,
                          client_context(mesh.ca, cert, key))


async def test_non_service_identity_is_refused(
        mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = mesh.ca.files(tmp_path, "spiffe://mesh.test/ns/default/sa/web")
    await _expect_refused(mesh, "wrong_identity", caplog, client_context(mesh.ca, cert, key))


async def test_unknown_service_is_refused(
        mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = mesh.ca.files(tmp_path, "spiffe://mesh.test/svc/web")
    await _expect_refused(mesh, "unknown_service", caplog, client_context(mesh.ca, cert, key),
                          sni="inventory")


async def test_valid_client_is_served_with_its_identity(mesh: Mesh, tmp_path: Path) -> None:
    cert, key = mesh.ca.files(tmp_path, "spiffe://mesh.test/svc/checkout")
    transport = await trio.open_tcp_stream("127.0.0.1", mesh.b.port)
    stream = trio.SSLStream(transport, client_context(mesh.ca, cert, key),
                            server_hostname="payments")
    await stream.send_all(b"GET /version HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n")
    answer = await read_until_eof(stream)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b'"x-meshd-source": "checkout"' in answer


async def test_outbound_refuses_server_with_wrong_identity(
        mesh: Mesh, tmp_path: Path, nursery: trio.Nursery,
        caplog: pytest.LogCaptureFixture) -> None:
    # An impostor with a perfectly valid certificate of the mesh CA, for another service.
    cert, key = mesh.ca.files(tmp_path, "spiffe://mesh.test/svc/evil")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(cert), str(key))
    served = []

    async def impostor(transport: trio.SocketStream) -> None:
        stream = trio.SSLStream(transport, server_ctx, server_side=True)
        try:
            await stream.do_handshake()
            served.append(await stream.receive_some(65536))
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, impostor, [listener])
    port = listener.socket.getsockname()[1]
    mesh.set_payments((("v1", 100), ("v2", 0)))
    mesh.set_endpoints("payments", [mesh.endpoint("payments", mesh.b, "v1", port=port)])
    async with httpx.AsyncClient(base_url=mesh.url()) as client:
        response = await client.get("/version")
    assert response.status_code == 503  # never reached an app
    assert response.headers["x-meshd-error"] == "wrong-identity"
    assert "spiffe://mesh.test/svc/evil" in response.text
    assert sample(mesh.a.metrics, "meshd_connection_errors_total", direction="outbound",
                  reason="wrong_identity") == 1
    assert not any(served)  # the request never went to the impostor
