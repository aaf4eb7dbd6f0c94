"""TLS identities (contexts, SPIFFE checks, reload) and the half-closable TLS stream."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from proxy_testing import TD, MiniCA

from meshd.errors import IdentityError
from meshd.identity.tls import HandshakeRefused, TLSState, UncheckedCertificate
from meshd.proxy.sockio import SocketConnection
from meshd.proxy.streams import TLSStream, accept_mtls, open_mtls


@pytest.fixture
def ca() -> MiniCA:
    return MiniCA.create()


@pytest.fixture
def identities(tmp_path: Path, ca: MiniCA) -> Path:
    directory = tmp_path / "certs"
    for service in ("web", "payments"):
        ca.write_identity(directory, service)
    return directory


async def _tls_pair(tls: TLSState, client_service: str = "web", sni: str = "payments",
                    *, over_sockets: bool = False) -> tuple[TLSStream, TLSStream]:
    """A handshaken client/server pair, over memory streams or (``over_sockets``) over a real
    socket pair with the data plane's ``SocketConnection``."""
    left: trio.abc.Stream
    right: trio.abc.Stream
    if over_sockets:
        a, b = socket.socketpair()
        left, right = SocketConnection(a), SocketConnection(b)
    else:
        left, right = trio.testing.memory_stream_pair()
    client = TLSStream(left, tls.client_context(client_service), server_side=False,
                       server_hostname=sni)
    server = TLSStream(right, tls.server_context, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


async def _receive_all(stream: TLSStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(65536):
        out += data
    return bytes(out)


async def test_half_close_keeps_the_other_direction_open(identities: Path) -> None:
    client, server = await _tls_pair(TLSState(identities, TD, ["web", "payments"]))
    await client.send_all(b"request")
    await client.send_eof()
    assert await _receive_all(server) == b"request"  # EOF arrived after the data
    await server.send_all(b"answer after the client's EOF")
    await server.aclose()
    assert await _receive_all(client) == b"answer after the client's EOF"
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"more")


async def test_half_close_with_unread_data_loses_nothing(identities: Path) -> None:
    """send_eof while the peer's data sits decrypted and undecrypted in our buffers."""
    client, server = await _tls_pair(TLSState(identities, TD, ["web", "payments"]))
    payload = os.urandom(300_000)
    await server.send_all(payload)
    first = await client.receive_some(10)
    await client.send_eof()
    assert await server.receive_some() == b""
    await server.aclose()
    assert first + await _receive_all(client) == payload


async def test_handshake_checks_identities_both_ways(identities: Path) -> None:
    tls = TLSState(identities, TD, ["web", "payments"])
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    seen = []
    client_certs = []

    async def server_side(transport: trio.SocketStream) -> None:
        stream, service, source = await accept_mtls(transport, tls)
        seen.append((service, source))
        client_certs.append(stream.peer_certificate())
        await stream.send_all(await stream.receive_some())
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, server_side, [listener])
        stream = await open_mtls("127.0.0.1", port, tls, "web", "payments")
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"ping"
        await stream.aclose()
        # web's certificate (as the server saw it) where payments' is expected fails the
        # client-side check; no certificate, or one without a readable serial, is no identity
        with pytest.raises(HandshakeRefused, match=r"presented spiffe://mesh\.test/svc/web, "
                                                   r"expected spiffe://mesh\.test/svc/payments"):
            tls.check_server(client_certs[0], "payments")
        for junk in (None, {}, {**client_certs[0], "serialNumber": "zz"}):
            with pytest.raises(HandshakeRefused, match="no SPIFFE ID"):
                tls.check_server(junk, "web")
        nursery.cancel_scope.cancel()
    assert seen == [("payments", "web")]


async def test_reload_serves_new_certificates_to_new_connections_only(
        identities: Path, ca: MiniCA) -> None:
    tls = TLSState(identities, TD, ["web", "payments"])
    old_client, old_server = await _tls_pair(tls)
    old_serial = _serial(old_client, tls)

    renewed = ca.write_identity(identities, "payments")
    tls.reload()
    new_client, _ = await _tls_pair(tls)
    assert _serial(new_client, tls) == renewed.serial_number != old_serial

    # the connection made before the reload carries on
    await old_client.send_all(b"still here")
    assert await old_server.receive_some() == b"still here"


async def test_a_worker_checks_its_files_against_the_supervisors_facts(
        identities: Path, ca: MiniCA) -> None:
    """A worker process never parses a certificate: it uses a file only if the supervisor
    read the very same bytes (``known``, by digest), and otherwise keeps what it has."""
    supervisor = TLSState(identities, TD, ["web", "payments"])
    worker = TLSState(identities, TD, ["web", "payments"], known=dict(supervisor.checked))
    client, _ = await _tls_pair(worker)
    old_serial = _serial(client, worker)

    renewed = ca.write_identity(identities, "payments")  # not checked by the supervisor yet
    with pytest.raises(UncheckedCertificate,
                       match=r"payments\.crt is not a certificate the supervisor has checked"):
        worker.reload()
    client, _ = await _tls_pair(worker)
    assert _serial(client, worker) == old_serial  # the contexts in force stay
    # a worker starting now has nothing in force to keep: payments is refused until checked
    starting = TLSState(identities, TD, ["web", "payments"], known=dict(supervisor.checked))
    assert "not a certificate the supervisor has checked" in str(
        starting.unusable_reason("payments"))
    assert starting.unusable_reason("web") is None

    supervisor.reload()
    for follower in (worker, starting):
        follower.known = dict(supervisor.checked)
        follower.reload()
        client, _ = await _tls_pair(follower)
        assert _serial(client, follower) == renewed.serial_number

    # the supervisor's facts decide validity: an expired certificate is never presented
    expired = {digest: replace(facts, not_after=0.0) for digest, facts in
               supervisor.checked.items()}
    assert "expired" in str(
        TLSState(identities, TD, ["payments"], known=expired).unusable_reason("payments"))


async def test_reload_failure_keeps_the_contexts_in_force(identities: Path) -> None:
    tls = TLSState(identities, TD, ["web", "payments"])
    (identities / "payments.crt").write_bytes(b"not a certificate")
    with pytest.raises(IdentityError, match=r"payments\.crt"):
        tls.reload()
    client, server = await _tls_pair(tls)  # still serving with what was loaded before
    await client.send_all(b"ok")
    assert await server.receive_some() == b"ok"


def test_missing_or_mismatched_identity_is_an_error(tmp_path: Path, ca: MiniCA) -> None:
    with pytest.raises(IdentityError, match=r"cannot load TLS identities"):
        TLSState(tmp_path, TD, ["web"])
    ca.write_identity(tmp_path, "web")
    (tmp_path / "web.crt").rename(tmp_path / "cart.crt")
    (tmp_path / "web.key").rename(tmp_path / "cart.key")
    with pytest.raises(IdentityError, match=r"not of spiffe://mesh\.test/svc/cart"):
        TLSState(tmp_path, TD, ["cart"])


def _serial(stream: TLSStream, tls: TLSState) -> int:
    der = stream.ssl_object.getpeercert(binary_form=True)
    assert der is not None
    serial = x509.load_der_x509_certificate(der).serial_number
    # what the checks read (OpenSSL's decoding) is the same serial, in the deny list's form
    assert tls.check_server(stream.peer_certificate(), "payments") == format(serial, "x")
    return serial


async def test_data_and_close_notify_read_together_over_a_socket(identities: Path) -> None:
    """The peer's data and its close_notify reach us in one read (OpenSSL may then hold the
    close_notify without reporting it as pending): the data comes first, then EOF, and the
    answer still goes back."""
    tls = TLSState(identities, TD, ["web", "payments"])
    client, server = await _tls_pair(tls, over_sockets=True)
    await client.send_all(b"ping")
    await client.send_eof()
    await trio.sleep(0.05)  # both records are in the server's socket buffer before it reads
    with trio.fail_after(5):
        assert await _receive_all(server) == b"ping"
        await server.send_all(b"pong")
        await server.aclose()
        assert await _receive_all(client) == b"pong"
    await client.aclose()


async def test_a_cancelled_receive_loses_no_decrypted_bytes(identities: Path) -> None:
    tls = TLSState(identities, TD, ["web", "payments"])
    client, server = await _tls_pair(tls, over_sockets=True)
    await client.send_all(b"first")
    await trio.sleep(0.05)
    with trio.CancelScope() as scope:
        scope.cancel()
        await server.receive_some()
    assert scope.cancelled_caught
    with trio.fail_after(5):
        assert await server.receive_some() == b"first"
    await client.aclose()
    await server.aclose()


async def test_receive_nowait_decrypts_only_what_is_already_there(identities: Path) -> None:
    """The read a keep-alive loop makes before setting up its idle wait: bytes OpenSSL or the
    socket already hold, None when it would wait, EOF at the peer's close_notify."""
    tls = TLSState(identities, TD, ["web", "payments"])
    client, server = await _tls_pair(tls, over_sockets=True)
    assert server.receive_nowait() is None
    await client.send_all(b"request")
    await trio.sleep(0.05)
    assert server.receive_nowait() == b"request"
    assert server.receive_nowait() is None
    await client.send_all(b"second")
    await trio.sleep(0.05)
    with trio.fail_after(5):  # what the quick read did not take, receive_some still gets
        assert await server.receive_some() == b"second"
    await client.send_eof()
    await trio.sleep(0.05)
    assert server.receive_nowait() == b""
    await client.aclose()
    await server.aclose()


async def test_receive_nowait_leaves_memory_transports_to_receive_some(
        identities: Path) -> None:
    tls = TLSState(identities, TD, ["web", "payments"])
    client, server = await _tls_pair(tls)  # over trio's memory streams: no quick read there
    await client.send_all(b"x")
    assert server.receive_nowait() is None
    with trio.fail_after(5):
        assert await server.receive_some() == b"x"
    await client.aclose()
    await server.aclose()
