"""The stream seam: everything above this module speaks ``trio.abc.HalfCloseableStream``.

Plain connections are ``SocketConnection`` (``meshd.proxy.sockio``: a raw non-blocking socket
that makes the system call first and parks only when it would block). mTLS connections are
``TLSStream``, a lean TLS stream over ``ssl.SSLObject`` and memory BIOs on top of a transport
stream. It exists (rather than ``trio.SSLStream``) for two reasons:

* ``send_eof``. Opaque TCP through the mesh must carry a half-close across the mTLS hop; TLS 1.3
  allows it (a ``close_notify`` closes one direction, RFC 8446 6.1) but ``trio.SSLStream``
  cannot send one and keep reading (nor can a non-blocking ``ssl.SSLSocket``: its ``unwrap``
  calls ``SSL_shutdown`` a second time, which reads and fails on any application data).
* cost. ``trio.SSLStream`` takes locks and yields on every call; here a read that OpenSSL can
  answer from what it holds returns at once, and the outgoing BIO is drained under a lock only
  when another task is draining it.

``open_mtls`` / ``accept_mtls`` are the only places that build TLS streams.
"""

from __future__ import annotations

import ssl

import trio

from meshd.identity.tls import (
    ALPN_H2,
    DecodedCertificate,
    HandshakeRefused,
    MeshSSLObject,
    TLSState,
    classify_tls_failure,
)
from meshd.proxy.sockio import SocketConnection, connect_tcp

RECEIVE_SIZE = 64 * 1024
CLOSE_NOTIFY_TIMEOUT = 0.5


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS over a transport stream. One task may send while another receives; ``send_eof``
    sends ``close_notify`` and leaves the receiving direction open."""

    def __init__(self, transport: trio.abc.Stream, context: ssl.SSLContext, *,
                 server_side: bool, server_hostname: str | None = None) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing,
                                           server_side=server_side,
                                           server_hostname=server_hostname)
        # Whoever holds this lock drains the outgoing BIO into the transport, so records go
        # out in the order OpenSSL produced them even when sender and receiver both write.
        self._transport_send = trio.StrictFIFOLock()
        self._plaintext = b""  # decrypted bytes set aside by send_eof, returned first
        self._sending = False
        self._receiving = False
        self._handshake_done = False
        self._eof_sent = False
        self._eof_received = False  # the peer's close_notify came
        self._read_error: ssl.SSLError | None = None  # found after returning data
        self._closed = False
        self._broken = False
        self.peer_serial = ""  # the peer certificate's serial (hex), once checked
        # what HTTP/1.1 keeps with an upstream connection between exchanges: its response
        # reader (``meshd.proxy.exchange``), reset rather than built again for each request
        self.response_reader: object = None

    def peer_certificate(self) -> DecodedCertificate | None:
        """The verified peer certificate, decoded by OpenSSL (``TLSState.check_*`` read it);
        None if Python cannot decode it (a SAN that is not UTF-8): no identity, refused."""
        try:
            return self.ssl_object.getpeercert()
        except ValueError:
            return None

    def idle_unusable(self) -> bool:
        """Like ``SocketConnection.idle_unusable``: anything waiting (a close_notify, an alert,
        EOF) on a connection at rest means the peer is done with it."""
        if (self._closed or self._broken or self._eof_received or self._plaintext
                or self._incoming.pending):
            return True
        transport = self.transport
        return isinstance(transport, SocketConnection) and transport.idle_unusable()

    def abort(self) -> None:
        """Cut the connection now, from outside the tasks using it (a revoked peer): the
        socket is closed, so their pending and next operations fail and they clean up."""
        self._broken = True
        transport = self.transport
        if isinstance(transport, SocketConnection):
            transport.close()
        elif isinstance(transport, trio.SocketStream):
            transport.socket.close()

    async def do_handshake(self) -> None:
        while True:
            try:
                self.ssl_object.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except ssl.SSLError as exc:
                self._broken = True
                await self._flush_alert()
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            await self._flush()
            self._handshake_done = True
            return

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        # A cancellation is noticed here, before anything is decrypted, and while waiting for
        # the transport; never after decrypting, which would lose the bytes. The transport's
        # reads are the scheduling points (and yield now and then).
        await trio.lowlevel.checkpoint_if_cancelled()
        self._receiving = True
        try:
            want = max_bytes or RECEIVE_SIZE
            while True:
                self._check_open()
                if self._plaintext:
                    data, self._plaintext = self._plaintext[:want], self._plaintext[want:]
                    return data
                if self._eof_received:
                    return b""
                if self._read_error is not None:
                    self._broken = True
                    raise trio.BrokenResourceError(f"TLS error: {self._read_error}")
                decrypted = self._decrypt(want)
                if decrypted is not None:
                    return decrypted
                if self._outgoing.pending and not self._transport_send.locked():
                    await self._flush()
                await self._fill()
        finally:
            self._receiving = False

    def _decrypt(self, want: int) -> bytes | None:
        """Up to ``want`` bytes OpenSSL can decrypt from what it holds (b"" once the peer's
        close_notify came), or None if it needs more from the transport."""
        try:
            return self._read(want)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError:
            self._eof_received = True
            return b""
        except ssl.SSLError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc

    def receive_nowait(self, max_bytes: int | None = None) -> bytes | None:
        """What ``receive_some`` would return without waiting for the transport (decrypted
        from what OpenSSL holds and what the transport has already received), or None if it
        would wait; like ``SocketConnection.receive_nowait``. Anything out of the ordinary
        (bytes set aside, an error found earlier, records to send first) is None: left to
        ``receive_some``."""
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._check_open()
        receive = getattr(self.transport, "receive_nowait", None)
        if (self._plaintext or self._eof_received or self._read_error is not None
                or receive is None):
            return None
        want = max_bytes or RECEIVE_SIZE
        for _ in range(2):  # from what OpenSSL holds; then once more after a transport read
            data = self._decrypt(want)  # b"": the peer's close_notify, as receive_some
            if data is not None:
                return data
            if self._outgoing.pending:
                return None  # OpenSSL has records to send first: receive_some does that
            data = receive(RECEIVE_SIZE)
            if data is None:
                return None
            if not data:
                self._broken = True
                raise trio.BrokenResourceError(
                    "peer closed the connection during the TLS session (no close_notify)")
            self._incoming.write(data)
        return None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await trio.lowlevel.checkpoint_if_cancelled()  # before OpenSSL takes the bytes
        self._sending = True
        try:
            self._check_open()
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof was called on this stream")
            if data:
                try:
                    self.ssl_object.write(data)
                except ssl.SSLError as exc:
                    self._broken = True
                    raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            await self._flush()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_open()
            if not self._eof_sent:
                self._close_notify()
            await self._flush()
        finally:
            self._sending = False

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self._handshake_done and not self._eof_sent and not self._broken:
                with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT) as scope:
                    scope.shield = True
                    try:
                        self._close_notify()
                        await self._flush()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        finally:
            await self.transport.aclose()

    # -- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._broken:
            raise trio.BrokenResourceError("the TLS connection failed earlier")

    def _read(self, want: int) -> bytes:
        """As many bytes as OpenSSL can decrypt now (up to ``want``), across records."""
        first = self.ssl_object.read(want)
        if not first or len(first) >= want:
            return first
        parts = [first]
        got = len(first)
        # OpenSSL may hold records it has read ahead and not reported by ``pending()``: a
        # short read here is fine (the next receive reads them), a read of an empty BIO is
        # an exception raised for nothing.
        while got < want and (self._incoming.pending or self.ssl_object.pending()):
            try:
                more = self.ssl_object.read(want - got)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._eof_received = True  # the next receive returns b""
                break
            except ssl.SSLError as exc:
                self._read_error = exc  # raised by the next receive
                break
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def _close_notify(self) -> None:
        """Send our close_notify, keeping the receive direction intact.

        ``SSLObject.unwrap`` calls ``SSL_shutdown`` twice; the second call reads, and fails on
        any application data it finds. So first take decrypted bytes and buffered ciphertext
        out of OpenSSL's reach, then put the ciphertext back for the receiver."""
        self._eof_sent = True
        pending = []
        while self.ssl_object.pending():
            try:
                pending.append(self.ssl_object.read(self.ssl_object.pending()))
            except ssl.SSLError:
                break
        self._plaintext += b"".join(pending)
        ciphertext = self._incoming.read()
        try:
            self.ssl_object.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify written; the peer's comes later, through receive_some
        except ssl.SSLError as exc:
            self._broken = True
            raise trio.BrokenResourceError(f"TLS error on shutdown: {exc}") from exc
        finally:
            if ciphertext:
                self._incoming.write(ciphertext)

    async def _fill(self) -> None:
        data = await self.transport.receive_some(RECEIVE_SIZE)
        if not data:
            self._broken = True
            what = "handshake" if not self._handshake_done else "session"
            raise trio.BrokenResourceError(
                f"peer closed the connection during the TLS {what} (no close_notify)")
        self._incoming.write(data)

    async def _flush(self) -> None:
        if not self._outgoing.pending:
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        lock = self._transport_send
        try:
            lock.acquire_nowait()  # the usual case: nobody else is draining
        except trio.WouldBlock:
            await lock.acquire()
        try:
            while self._outgoing.pending:
                try:
                    await self.transport.send_all(self._outgoing.read())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._broken = True
                    raise
        finally:
            lock.release()

    async def _flush_alert(self) -> None:
        """Best effort: tell the peer why the handshake failed (OpenSSL queued an alert)."""
        if not self._outgoing.pending:
            return
        with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
            try:
                await self.transport.send_all(self._outgoing.read())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


async def open_mtls(address: str, port: int, tls: TLSState, source: str,
                    destination: str, *, h2: bool = False) -> TLSStream:
    """Connect to a meshd inbound listener as ``source`` and check it serves ``destination``
    (``h2``: and that it speaks HTTP/2, negotiated by ALPN).

    The caller bounds the time with ``fail_after``. Raises ``OSError`` when the connection
    cannot be made and ``HandshakeRefused`` when TLS or the identity check fails."""
    # before connecting: a failure here leaks no socket
    context = tls.client_context(source, h2=h2)
    transport = await connect_tcp(address, port)
    stream = TLSStream(transport, context, server_side=False, server_hostname=destination)
    try:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            label, text = classify_tls_failure(exc)
            raise HandshakeRefused(label, f"{address}:{port} ({destination}): {text}") from exc
        stream.peer_serial = tls.check_server(stream.peer_certificate(), destination)
        if h2 and stream.ssl_object.selected_alpn_protocol() != ALPN_H2:
            raise HandshakeRefused("no_h2", f"{address}:{port} ({destination}) does not speak "
                                   "HTTP/2 (ALPN h2 not accepted: a meshd too old?)")
        tls.track(stream)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def accept_mtls(transport: trio.abc.Stream, tls: TLSState) -> tuple[TLSStream, str, str]:
    """Run the server side of the handshake on an accepted connection; return the stream (its
    ``peer_serial`` set), the local service the client asked for (SNI) and the calling service
    (its SPIFFE ID).

    The caller bounds the time. Raises ``HandshakeRefused`` (and leaves closing to the
    caller)."""
    stream = TLSStream(transport, tls.server_context, server_side=True)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        obj = stream.ssl_object
        if isinstance(obj, MeshSSLObject) and obj.sni_refusal:
            raise HandshakeRefused("unknown_service", obj.sni_refusal) from exc
        if exc.__cause__ is None:
            raise HandshakeRefused("handshake_eof",
                                   "client closed the connection during the handshake") from exc
        label, text = classify_tls_failure(exc)
        raise HandshakeRefused(label, text) from exc
    peer = tls.check_client(stream.peer_certificate())
    stream.peer_serial = peer.serial
    tls.track(stream)
    source = peer.service
    obj = stream.ssl_object
    service = obj.sni if isinstance(obj, MeshSSLObject) else None
    if not service:
        raise HandshakeRefused("unknown_service", "client sent no SNI")
    return stream, service, source


def negotiated_h2(stream: TLSStream) -> bool:
    """Whether the client chose HTTP/2 by ALPN."""
    return stream.ssl_object.selected_alpn_protocol() == ALPN_H2
